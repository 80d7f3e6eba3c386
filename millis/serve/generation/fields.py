"""The request fields of the generation routes that are not read as values: those the engine cannot honour, accepted
only at their "off" value, and the check that refuses a typo of a field that is read."""
from __future__ import annotations

import difflib
import itertools

from millis.serve.schemas import ApiError, same_value

# fields the engine cannot honour: accepted only at their "off" value
UNSUPPORTED = {"echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "functions": (None, []),
               # vLLM's and llama.cpp's sampling fields: a client that sends one expects it to act (min_p 1 is
               # greedy there; here it sampled as if unset)
               "min_p": (None, 0), "typical_p": (None, 1), "min_tokens": (None, 0), "stop_token_ids": (None, []),
               "prompt_logprobs": (None,), "use_beam_search": (None, False), "length_penalty": (None, 1),
               "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
               "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
               "mirostat": (None, 0), "tfs_z": (None, 1), "top_a": (None, 0), "dry_multiplier": (None, 0),
               "xtc_probability": (None, 0)}
# every field the routes read, and OpenAI's that change nothing here (accepted, unread): a field one typo away from
# one of these is refused naming it ({"tempreature": 0} sampled at temperature 1), any other passes (clients add
# their own)
READ_FIELDS = frozenset({"model", "prompt", "messages", "stream", "stream_options", "n", "max_tokens",
                         "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty",
                         "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs",
                         "ignore_eos", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                         "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "user", "store",
                         "metadata", "service_tier", "reasoning_effort", "modalities", "prediction", "audio",
                         "web_search_options", "verbosity", "safety_identifier", "prompt_cache_key"})

MAX_LOOKED_AT = 64  # unknown fields compared with the read ones, per request
READ_ORDER = sorted(READ_FIELDS)  # difflib's candidates, in one order


def check_fields(body: dict) -> None:
    """422 naming the field: an unsupported one not at its "off" value, or one a typo away from a read one."""
    for key, off in UNSUPPORTED.items():
        if not any(same_value(body.get(key), o) for o in off):
            raise ApiError(422, f"{key} is not supported by this server (leave it unset)", param=key,
                           code="unsupported")
    # a client's own fields pass; at most MAX_LOOKED_AT of them are compared (difflib costs ~50 us a key, and a body
    # of 100,000 junk keys would hold the event loop for seconds)
    unknown = (k for k in body if k not in READ_FIELDS and k not in UNSUPPORTED and len(k) >= 4)
    for key in itertools.islice(unknown, MAX_LOOKED_AT):
        plain = key.lower().replace("-", "_")  # "top-p", "Temperature"
        near = [plain] if plain in READ_FIELDS else difflib.get_close_matches(plain, READ_ORDER, 1, 0.85)
        if near:
            raise ApiError(422, f"unknown field {key!r}: did you mean {near[0]!r}? (it would have been ignored)",
                           param=key, code="unknown_field")
