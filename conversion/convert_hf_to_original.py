"""Convert a bd3lm_hf folder back into the original bd3lms Hub format (config.json + model.safetensors).

    python conversion/convert_hf_to_original.py SRC DST

Same as `bd3lm-hf convert SRC DST --to-original`; the work is done by `bd3lm_hf.conversion`.
"""

import sys

from bd3lm_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--to-original"]))
