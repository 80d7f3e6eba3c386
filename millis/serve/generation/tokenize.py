"""/tokenize and /detokenize (vLLM's shapes): what the served model's tokenizer makes of a prompt or a
conversation (through the chat template, as /v1/chat/completions would), and the text of token ids.

    POST /tokenize    {"prompt": "..."} or {"messages": [...]}  -> {"tokens": [...], "count", "max_model_len"}
    POST /detokenize  {"tokens": [...]}                         -> {"prompt": "..."}

Bad input is a 422 naming the field; the same size limits as the generation routes apply."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from millis.serve.generation import schemas as gs
from millis.serve.http import endpoint, json_response, off_loop, read_json
from millis.serve.schemas import ApiError


def tokenize_routes(st) -> list[Route]:
    """The two routes over a GenState `st` (its engine, tokenizer, chat template and limits)."""

    async def tokenize(request: Request) -> Response:
        eng = st.require()
        body = await read_json(request, st.limits)
        chat = "messages" in body
        if chat and "prompt" in body:
            raise ApiError(422, "send either prompt or messages, not both", param="messages", code="invalid_value")
        # chat: the tools too, which the template shows the model (they count), as /v1/chat/completions renders them
        keep = ("model", "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                "chat_template_kwargs", "add_generation_prompt", "continue_final_message") if chat else \
            ("model", "prompt")
        fields = {k: body[k] for k in keep if k in body}
        # the chat route's tool format: earlier calls are shown, and counted, as that route shows them
        g = gs.chat_request(fields, st.name, st.gen_limits, st.chat.format, st.chat.tool_use_format) if chat else \
            gs.completion_request(fields, st.name, st.gen_limits)
        ids = await st.prompt_ids(g)
        if isinstance(g.prompt, list) and any(t < 0 or t >= eng.config.vocab_size for t in ids):  # as completions
            raise ApiError(400, f"prompt token ids must be in 0..{eng.config.vocab_size - 1}", param="prompt",
                           code="invalid_prompt")
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": st.context})

    async def detokenize(request: Request) -> Response:
        eng = st.require()
        body = await read_json(request, st.limits)
        toks = body.get("tokens")
        if not isinstance(toks, list) or len(toks) > eng.max_seq or \
                not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
            raise ApiError(422, f"tokens must be a list of at most {eng.max_seq} token ids", param="tokens",
                           code="invalid_type")
        if any(t < 0 or t >= eng.config.vocab_size for t in toks):
            raise ApiError(422, f"token ids must be in 0..{eng.config.vocab_size - 1}", param="tokens",
                           code="invalid_value")
        if eng.tok is None:
            raise ApiError(400, "this model has no tokenizer", param="tokens", code="no_tokenizer")
        return json_response({"prompt": await off_loop(eng.tok.decode, toks)})

    return [Route("/tokenize", endpoint(st, "/tokenize", tokenize), methods=["POST"]),
            Route("/detokenize", endpoint(st, "/detokenize", detokenize), methods=["POST"])]
