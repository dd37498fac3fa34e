"""`python -m walletmig ...` runs the CLI."""

from walletmig.cli import main

if __name__ == "__main__":
    main()
