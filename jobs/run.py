"""Ray job entrypoint for `flywheel run` (the controller): the same function as the CLI verb.

    ray job submit --working-dir . -- python jobs/run.py --config jobs/run.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flywheel.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
