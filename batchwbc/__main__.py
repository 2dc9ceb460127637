"""`python -m batchwbc` = the `batchwbc` command (also what spawned workers re-import safely)."""
from batchwbc.cli import main

if __name__ == "__main__":
    main()
