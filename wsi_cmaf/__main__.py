import sys

from wsi_cmaf.cli import main

sys.exit(main())
