"""Ray job entrypoint for `flywheel keys`: the same function as the CLI verb.

    ray job submit --working-dir . -- python jobs/keys.py --config jobs/keys.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flywheel.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["keys", *sys.argv[1:]]))
