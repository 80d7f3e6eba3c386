"""Checks shared by the native encoder's tests (test_native_encoder.py, test_int8_attention.py)."""
import numpy as np


def token_and_row_split(model, ids, mask, types):
    """A NativeBert's vectors with bert_forward.c's token split always on (each thread its tokens through a whole
    layer) and never (each matrix's rows shared out); row 0 alone (one sequence cut in parts) must be the same
    either way. Returns (token split, row split)."""
    default = model.lib.bert_token_split(-1)
    assert default > 0
    try:
        model.lib.bert_token_split(0)  # always
        tokens = model(ids, mask, types)
        one = model(ids[:1], mask[:1], types[:1])
        model.lib.bert_token_split(1 << 20)  # never
        rows = model(ids, mask, types)
        assert np.array_equal(one[0], model(ids[:1], mask[:1], types[:1])[0])
    finally:
        model.lib.bert_token_split(default)
    return tokens, rows
