"""Convert an original bd3lms checkpoint (Hub folder or Lightning .ckpt, EMA weights) into a bd3lm_hf folder.

    python conversion/convert_original_to_hf.py SRC DST [--block-size N --model-length L] [--no-ema]

Same as `bd3lm-hf convert SRC DST`; the work is done by `bd3lm_hf.conversion`.
"""

import sys

from bd3lm_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
