import sys

from pretrain.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
