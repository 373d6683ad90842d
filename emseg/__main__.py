"""``python -m emseg`` runs the CLI (also under ``torchrun``)."""

from emseg.cli import main

if __name__ == "__main__":
    main()
