"""``python -m relay`` is the ``switchboard`` command."""

from relay.cli import main

if __name__ == "__main__":
    main()
