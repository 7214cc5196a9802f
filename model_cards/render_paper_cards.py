"""Write the model cards of the converted paper checkpoints: python model_cards/render_paper_cards.py"""

import argparse
from pathlib import Path

from bd3lm_hf.model_card import PAPER_CHECKPOINTS, paper_card

if __name__ == "__main__":
    # no options: the parser gives --help (and refuses anything else) before any card is rewritten
    argparse.ArgumentParser(description=f"Rewrite {', '.join(PAPER_CHECKPOINTS)}.md in this folder from "
                                        "bd3lm_hf.model_card.paper_card.").parse_args()
    for name in PAPER_CHECKPOINTS:
        path = Path(__file__).parent / f"{name}.md"
        path.write_text(str(paper_card(name)))
        print(f"wrote {path}")
