import sys

from pylguest.cli import main

sys.exit(main())
