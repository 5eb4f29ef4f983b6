"""``python -m attndenoise``: the same command line as the ``attndenoise`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
