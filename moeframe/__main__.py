import sys

from moeframe.cli.main import main

sys.exit(main())
