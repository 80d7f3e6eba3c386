"""TEI's routes on the encoder server (tei.py reads and answers their bodies): /embed, /predict and /rerank by
task, /embed_all, /embed_sparse (SPLADE) and /similarity for an embedder; / and /invocations as TEI routes them by
model type (an embedder embeds, or compares sentences when `inputs` is an object; a classifier with one label
reranks, another predicts); GET /info; GET / and /ping as /ready; POST /decode (tei_tokens.py; TEI's /tokenize shares
millis's route: app.py)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Iterable, Iterator

import numpy as np
import orjson

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from millis.runtimes.base import no_token_states
from millis.serve.encoder import tei, tei_tokens
from millis.serve.encoder.rerank import TEI, tei_rerank_response
from millis.serve.http import endpoint, json_response, read_json, ready_response
from millis.serve.schemas import ApiError, reject_of


PIECE_FLOATS = 1 << 15  # floats a piece of /embed_all's answer: ~1 ms of orjson, which holds the GIL throughout


async def nested_json(groups: Iterable[Iterable[bytes]]) -> AsyncIterator[bytes]:
    """A JSON list of lists, each inner list from its group's pieces (JSON values joined by commas, no brackets),
    the loop free between pieces: orjson keeps the GIL, so a large answer in a thread would still stall the loop (a
    4,096-token /embed_all answer at D = 768 is 34 MB, 0.12 s of orjson). The groups are lazy: each piece is built
    when it is sent."""
    yield b"["
    for i, pieces in enumerate(groups):
        yield b",[" if i else b"["
        for j, piece in enumerate(pieces):
            yield b"," + piece if j else piece
            await asyncio.sleep(0)
        yield b"]"
    yield b"]"


def state_pieces(a: np.ndarray) -> Iterator[bytes]:
    """(tokens, D) states in pieces of about PIECE_FLOATS floats: rows, without brackets (/embed_all)."""
    step = max(1, PIECE_FLOATS // max(a.shape[1], 1))
    for r in range(0, len(a), step):
        yield orjson.dumps(a[r:r + step], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]


def weight_pieces(v: np.ndarray) -> Iterator[bytes]:
    """A SPLADE vector's nonzero weights, {"index", "value"} by index, about PIECE_FLOATS / 2 a piece (/embed_sparse:
    a dense vocabulary-wide vector is as many objects; 64 of 30,522 held the loop 0.77 s in one piece, a reviewer's
    ad hoc measure)."""
    nz, step = np.flatnonzero(v), PIECE_FLOATS // 2
    for r in range(0, len(nz), step):
        at = nz[r:r + step]
        yield orjson.dumps([{"index": k, "value": x} for k, x in zip(at.tolist(), v[at].tolist())])[1:-1]


def json_pieces(out: list[np.ndarray]) -> AsyncIterator[bytes]:
    """/embed_all's answer: a list per text of its tokens' states."""
    return nested_json(state_pieces(a) for a in out)


# the paths tei_routes answers in TEI's shape (the Ray gateway answers its own errors on them so too)
TEI_PATHS = frozenset({"/embed", "/embed_all", "/embed_sparse", "/similarity", "/predict", "/rerank", "/",
                       "/invocations", "/info", "/decode"})


def tei_routes(st, infer: Callable, answer: Callable, rerank: Callable, post: Callable,
               timing_headers: Callable, offload: Callable) -> dict[str, list[Route]]:
    """{task: its routes} ("": every task's), from create_app's request steps (`infer`: the model and the body;
    `answer`: tokenize and run; `rerank`: a cross-encoder's scores in a route's shape; `offload`: large work in a
    thread while the request lasts)."""
    async def embed(request: Request) -> Response:
        return await embed_body(request, *await infer(request, "embed"))

    async def embed_body(request: Request, model, body: dict, arrived: float) -> Response:
        unit = model.meta.source.pooling.normalize
        req = tei.embed_request(body, st.dim, unit, st.limits, tei.sparse_model(model), model.encoder.prompts)
        job, cut, tok_s, _ = await answer(request, arrived, model, req.texts, field="inputs",
                                          reject=reject_of(req.truncate))
        return json_response(tei.embed_response(job.out, req, unit), headers=timing_headers(job, tok_s, cut))

    async def embed_all(request: Request) -> Response:
        model, body, arrived = await infer(request, "embed")
        req = tei.embed_all_request(body, st.limits, prompts=model.encoder.prompts)
        if not st.gives_token_states():
            raise ApiError(424, no_token_states(model.meta.variant.runtime), param="inputs", code="no_token_states")
        job, cut, tok_s, _ = await answer(request, arrived, model, req.texts, field="inputs",
                                          reject=reject_of(req.truncate), tokens=True)
        return StreamingResponse(json_pieces(job.out), 200, timing_headers(job, tok_s, cut), "application/json")

    async def embed_sparse(request: Request) -> Response:
        model, body, arrived = await infer(request, "embed")
        req = tei.embed_all_request(body, st.limits, "/embed_sparse", model.encoder.prompts)
        if not tei.sparse_model(model):
            raise ApiError(424, f"this model pools {model.meta.source.pooling.mode} vectors: /embed_sparse answers a "
                                f"SPLADE model's (sentence-transformers' SparseEncoder: SpladePooling in modules.json)",
                           param="inputs", code="not_sparse")
        job, cut, tok_s, _ = await answer(request, arrived, model, req.texts, field="inputs",
                                          reject=reject_of(req.truncate))
        return StreamingResponse(nested_json(weight_pieces(v) for v in job.out), 200,
                                 timing_headers(job, tok_s, cut), "application/json")

    async def similarity(request: Request) -> Response:
        return await similarity_body(request, *await infer(request, "embed"))

    async def similarity_body(request: Request, model, body: dict, arrived: float) -> Response:
        req = tei.similarity_request(body, st.limits, model.encoder.prompts)
        job, cut, tok_s, _ = await answer(request, arrived, model, req.texts, field="inputs",
                                          reject=reject_of(req.truncate),
                                          places=tei.similarity_places(len(req.texts)))
        return json_response(tei.similarity_response(job.out), headers=timing_headers(job, tok_s, cut))

    async def predict(request: Request) -> Response:
        model, body, arrived = await infer(request, "classify")
        req = tei.predict_request(body, st.limits)
        out, cut = [None] * len(req.texts), [False] * len(req.texts)
        groups = [(query, [req.texts[i] if query is None else req.seconds[i] for i in places], places)
                  for query, places in tei.predict_groups(req)]  # single texts, then pairs by first text: one job
        job, got, tok_s, _ = await answer(request, arrived, model, None, field="inputs",
                                          reject=reject_of(req.truncate), groups=groups)
        for i, o, c in zip((i for _, _, places in groups for i in places), job.out, got):
            out[i], cut[i] = o, c
        return json_response(tei.predict_response(out, model.id2label, req, model.problem_type),
                             headers=timing_headers(job, tok_s, cut))

    async def tei_rerank(request: Request) -> Response:
        req, scores, cut, job, tok_s, _ = await rerank(request, TEI)
        return json_response(tei_rerank_response(scores, req.documents, req.top_n, req.return_documents),
                             headers=timing_headers(job, tok_s, cut))

    def hosted():
        return st.require(st.model.task if st.model is not None else "")

    async def root(request: Request) -> Response:
        if hosted().task != "embed":
            return await (tei_rerank if len(st.model.id2label) == 1 else predict)(request)
        model, body, arrived = await infer(request, "embed")  # `inputs` as an object: sentence similarity's
        return await (similarity_body if isinstance(body.get("inputs"), dict) else embed_body)(request, model, body,
                                                                                               arrived)

    async def alive(request: Request) -> Response:  # TEI's GET / and /ping (SageMaker's health check): /ready's answer
        return ready_response(st, st.model is not None)

    async def info(request: Request) -> Response:
        return json_response(tei.info(st.name, hosted(), st.cfg))

    async def decode(request: Request) -> Response:  # ids -> texts with the model's tokenizer, whatever the task
        arrived = asyncio.get_running_loop().time()
        model = hosted()
        body = await read_json(request, st.limits)
        return await tei_tokens.decode(model, body, st.limits, offload(st, request, arrived))

    return {"embed": [post("/embed", embed, tei.INVALID), post("/embed_all", embed_all, tei.INVALID),
                      post("/embed_sparse", embed_sparse, tei.INVALID), post("/similarity", similarity, tei.INVALID)],
            "classify": [post("/predict", predict, tei.INVALID), post("/rerank", tei_rerank, tei.INVALID)],
            "": [post("/", root, tei.INVALID), post("/invocations", root, tei.INVALID),
                 Route("/info", endpoint(st, "/info", info, tei.INVALID), methods=["GET"]),
                 post("/decode", decode, tei.INVALID),
                 *(Route(path, alive, methods=["GET"]) for path in ("/", "/ping"))]}  # probes: not counted, as /ready
