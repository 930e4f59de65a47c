"""Register keruta's block types with Prefect and seed the `default` documents from
blocks/application.properties — only if they do not exist yet (edits made in the Prefect UI win).

    python blocks/register.py            # = keruta-prefect blocks seed --properties blocks/application.properties
    python blocks/register.py --force    # overwrite the stored documents with the file
"""

import sys
from pathlib import Path

from keruta_prefect.cli import main

if __name__ == "__main__":
    properties = Path(__file__).with_name("application.properties")
    raise SystemExit(main(["blocks", "seed", "--properties", str(properties), *sys.argv[1:]]))
