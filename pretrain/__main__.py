import sys

from pretrain.run.train import main

if __name__ == "__main__":
    sys.exit(main())
