"""The package's messages and progress bars follow transformers' switches, as transformers' own do."""

import logging

from conftest import random_model
from transformers.utils import logging as hf_logging

from bd3lm_hf.evaluation import nelbo_perplexity
from bd3lm_hf.tokenization import train_bpe_tokenizer


def test_package_loggers_follow_transformers_verbosity(caplog):
    """bd3lm_hf.* loggers sat outside transformers' logger tree: set_verbosity_error() did not silence their
    warnings, and set_verbosity_info() did not show their results (the clip range found, the EMA copied)."""
    logger = hf_logging.get_logger("bd3lm_hf.training")
    previous = hf_logging.get_verbosity()
    try:
        with caplog.at_level(logging.DEBUG):  # the root logger lets everything through: transformers' level decides
            hf_logging.set_verbosity_error()
            logger.warning("a warning after set_verbosity_error")
            hf_logging.set_verbosity_info()
            logger.info("an info message after set_verbosity_info")
    finally:
        hf_logging.set_verbosity(previous)
    assert "a warning after set_verbosity_error" not in caplog.text
    assert "an info message after set_verbosity_info" in caplog.text


def test_the_nelbo_progress_bar_follows_disable_progress_bar(tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("To be, or not to be, that is the question. " * 30)
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=258)
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    hf_logging.disable_progress_bar()
    try:
        nelbo_perplexity(model, tokenizer, [held_out], batch_size=4)
    finally:
        hf_logging.enable_progress_bar()
    assert "NELBO" not in capsys.readouterr().err
    nelbo_perplexity(model, tokenizer, [held_out], batch_size=4)
    assert "NELBO" in capsys.readouterr().err


def test_messages_reach_a_root_handler_through_transformers_propagation():
    """As transformers' own messages: a root handler (logging.basicConfig) gets them once propagation is on."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("bd3lm_hf.data")
    logging.getLogger().addHandler(handler)
    try:
        hf_logging.disable_propagation()
        logger.warning("kept inside transformers' handler")
        hf_logging.enable_propagation()
        logger.warning("passed on to the root handler")
    finally:
        logging.getLogger().removeHandler(handler)
        hf_logging.enable_propagation()  # as conftest sets it
    assert [record.getMessage() for record in records] == ["passed on to the root handler"]
