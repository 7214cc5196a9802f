"""Convert a bd3lm_hf folder back into the original bd3lms Hub format (config.json + model.safetensors).

    python conversion/convert_hf_to_original.py SRC DST [--code-from ORIGINAL_HUB_DOWNLOAD]

Same as `bd3lm-hf convert SRC DST --to-original`; the work is done by `bd3lm_hf.conversion`. `--code-from` copies
the original code files (configuration_bd3lm.py, modeling_bd3lm.py) from a download of an original Hub repo.
"""

import sys

from bd3lm_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--to-original"]))
