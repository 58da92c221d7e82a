"""`python -m headstyle` (and `accelerate launch -m headstyle`) runs the command line."""

from headstyle.cli import main

if __name__ == "__main__":
    main()
