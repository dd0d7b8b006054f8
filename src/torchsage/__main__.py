import sys

from torchsage.cli import main

sys.exit(main())
