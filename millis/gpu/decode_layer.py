"""One kernel a layer for a batch-1 Llama decode step: the five kernels of millis.gpu.decode_gemv's step
(RMSNorm + qkv, RoPE + cache + attention, out projection + residual, RMSNorm + gate/up + SwiGLU, down +
residual) as five phases of one persistent kernel, a grid-wide barrier between them. SmolLM2's step goes from
152 kernels to 33 (embedding, the barriers' reset, 30 layers, the head): on the two H200 runs a step of
152 kernels took 0.81-0.87 ms where its matmuls read 0.27 GB (~0.06 ms at 4.8 TB/s), bound by launches
and the gaps between them, not by bytes.

- The grid is one program per SM (all resident at once: the barrier's condition), each phase's work split
  in tiles over them (`for t in range(pid, tiles, programs)`): the matmuls' BN-row tiles (decode_gemv's
  `gemv_tile`, the same rounding), the attention one program per KV head (decode_kernels'
  `rope_attention_head`).
- The barrier (`grid_sync`): each program's threads sync, one arrives on the phase's counter with release
  semantics and polls it with acquire semantics until every program has arrived. The counters (4 a layer)
  are zeroed once a step, before the layers (a memset in the graph). Loads of what another program wrote in
  the same kernel (x, qkv, the attention output, gate/up's output) bypass L1 (".cg"), which is not coherent
  across SMs. A poll gives up after MAX_SPIN tries instead of hanging: it raises the model's flag and fills
  the residual stream with NaN (the step's logits visibly wrong, not plausibly so). The engine checks the flag
  at load (`failed`) and after every batch-1 step (GraphedDecode: a copy to pinned memory, read at the next
  step, no sync of its own), and goes back to decode_gemv's kernels when it is set.
- Without a GPU (Triton's interpreter runs programs one after another, so a barrier would never open) each
  phase is its own launch of the same kernel: the tests check the phases' arithmetic against the torch step,
  and the kernel compiled for sm_90 here (ptxas ships with Triton) shows the barrier's instructions; its
  run is left to the GPU tests.
- `MILLIS_NO_DECODE_LAYER=1` turns it off (the A/B switch; bench/gpu_decode.py reports both).
"""
from __future__ import annotations


import torch
from torch import nn

from millis.gpu.decode_gemv import FORMATS, dtype_name, fmt_of, ptx_of
from millis.gpu.decode_kernels import pdl_launch
from millis.gpu.graph_timing import time_candidates
from millis.gpu.weight_only_kernels import GROUP
from millis.common.config import env_switch

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

MAX_SPIN = 1 << 16  # polls of one barrier before it gives up (~0.1 s; a phase takes a few hundred): a wrong
                    # grid costs a flag, not a hang
PHASES = 5
# tiles: one program per SM streams its weights with no other program there to hide its loads' latency, so
# the candidates read wide tiles (8-32 rows x 256-1024 inputs) with 4-8 warps; per_sm 2 (two programs an
# SM, if both fit: `tune` drops them where a barrier gave up) doubles the loads in flight
DEFAULT = {"BN": 8, "BK": 512, "GPS": 4, "num_warps": 8, "per_sm": 1}
# few: each is a compile of a large kernel (~3 s) per weight format, paid at an engine's first open
CANDIDATES = [DEFAULT, {"BN": 16, "BK": 512, "GPS": 4, "num_warps": 8, "per_sm": 1},
              {"BN": 4, "BK": 1024, "GPS": 8, "num_warps": 8, "per_sm": 1}]
WIDE = [{"BN": 8, "BK": 256, "GPS": 4, "num_warps": 4, "per_sm": 2}]
TUNED: dict[tuple, dict] = {}  # tune_key -> the config `tune` measured fastest (and found resident)

if triton is not None:
    from millis.gpu.decode_gemv import first_chunk, gemv_tile, row_rstd
    from millis.gpu.decode_kernels import gdc_enter, rope_attention_head

    @triton.jit
    def grid_sync(bar_ptr, flag_ptr, x_ptr, D, programs: tl.constexpr, MAX_SPIN_: tl.constexpr):
        # every program of the grid arrives once on the counter bar_ptr (zero before the kernel) and leaves when
        # all `programs` have; after MAX_SPIN_ polls it leaves anyway, sets flag_ptr and poisons the residual
        # stream x (D,) with NaN: the step's logits are then visibly wrong, never plausibly so
        tl.debug_barrier()  # this program's threads' writes done before it arrives
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        n = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        spins = n * 0  # an int32 tensor: the loop carries it
        while (n < programs) & (spins < MAX_SPIN_):
            n = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        if n < programs:
            tl.atomic_xchg(flag_ptr, 1)
            rd = tl.arange(0, 1024)
            for d0 in range(0, D, 1024):
                tl.store(x_ptr + d0 + rd, float("nan"), mask=d0 + rd < D)
        tl.debug_barrier()

    @triton.jit
    def _layer_kernel(x_ptr, qkv_ptr, o_ptr, h_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr,
                      n1_ptr, wq_ptr, sq_ptr, lq_ptr, bq_ptr, wo_ptr, so_ptr, lo_ptr,
                      n2_ptr, wu_ptr, su_ptr, lu_ptr, wd_ptr, sd_ptr, ld_ptr, bar_ptr, flag_ptr,
                      D, H, NQKV, NH, NKV, S, L, window, scale, eps, swq, swo, swu, swd,
                      FMT: tl.constexpr, HAS_B: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                      HS: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GPS: tl.constexpr, GROUP_: tl.constexpr, PH0: tl.constexpr,
                      PH1: tl.constexpr, SYNC: tl.constexpr, CM: tl.constexpr, MAX_SPIN_: tl.constexpr,
                      PROGS: tl.constexpr, PRE: tl.constexpr, GDC: tl.constexpr):
        # one layer of the batch-1 step, phases [PH0, PH1) (all five with SYNC: barriers between them).
        # x (D,): the residual stream, updated in place; qkv (NQKV,), o (NH * HS,), h (H,): scratch rows.
        # PROGS: the grid's size (programs loop over tiles with that stride). PRE (not int4): each program's
        # first tile of a matmul phase has its weights' first chunk loaded ahead (decode_gemv.first_chunk):
        # qkv's before the PDL wait, the others' before the barrier in front of their phase, so their latency
        # overlaps the wait (the phased launches, without barriers, load them as their phase starts).
        pid = tl.program_id(0)
        programs = PROGS
        q0, _q = 0.0, 0.0
        if PRE and PH0 <= 0 and PH1 > 0:
            q0, _q = first_chunk(pid, wq_ptr, D, NQKV, swq, False, BN, BK)
        gdc_enter(GDC)
        if PH0 <= 0 and PH1 > 0:  # RMSNorm + qkv (+ Qwen2's bias)
            rstd = row_rstd(x_ptr, D, eps, BK, CM)
            for t in range(pid, tl.cdiv(NQKV, BN), programs):
                gemv_tile(t, rstd, x_ptr, n1_ptr, wq_ptr, sq_ptr, lq_ptr, bq_ptr, x_ptr, qkv_ptr, D, NQKV, NQKV, swq,
                          q0, q0, t == pid, FMT, True, False, False, HAS_B, False, BN, BK, GPS, GROUP_, CM, PRE)
            if SYNC:
                grid_sync(bar_ptr, flag_ptr, x_ptr, D, programs, MAX_SPIN_)
        o0, _o = 0.0, 0.0
        if PH0 <= 1 and PH1 > 1:  # RoPE + the cache's new key and value + attention, a program per KV head
            row = pid * 0
            for j in range(pid, NKV, programs):
                rope_attention_head(row, j, qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, o_ptr, NH, NKV, S,
                                    NQKV, L, window, scale, G, GP, HS, BL, PREC, CM)
            if SYNC:
                if PRE:
                    o0, _o = first_chunk(pid, wo_ptr, NH * HS, D, swo, False, BN, BK)
                grid_sync(bar_ptr + 1, flag_ptr, x_ptr, D, programs, MAX_SPIN_)
        g0, u0 = 0.0, 0.0
        if PH0 <= 2 and PH1 > 2:  # out projection, added into x
            if PRE and not SYNC:
                o0, _o = first_chunk(pid, wo_ptr, NH * HS, D, swo, False, BN, BK)
            for t in range(pid, tl.cdiv(D, BN), programs):
                gemv_tile(t, 1.0, o_ptr, o_ptr, wo_ptr, so_ptr, lo_ptr, o_ptr, x_ptr, x_ptr, NH * HS, D, D, swo,
                          o0, o0, t == pid, FMT, False, False, True, False, False, BN, BK, GPS, GROUP_, CM, PRE)
            if SYNC:
                if PRE:
                    g0, u0 = first_chunk(pid, wu_ptr, D, H, swu, True, BN, BK)
                grid_sync(bar_ptr + 2, flag_ptr, x_ptr, D, programs, MAX_SPIN_)
        d0, _d = 0.0, 0.0
        if PH0 <= 3 and PH1 > 3:  # RMSNorm + gate/up + SwiGLU
            if PRE and not SYNC:
                g0, u0 = first_chunk(pid, wu_ptr, D, H, swu, True, BN, BK)
            rstd = row_rstd(x_ptr, D, eps, BK, CM)
            for t in range(pid, tl.cdiv(H, BN), programs):
                gemv_tile(t, rstd, x_ptr, n2_ptr, wu_ptr, su_ptr, lu_ptr, x_ptr, x_ptr, h_ptr, D, H, 2 * H, swu,
                          g0, u0, t == pid, FMT, True, True, False, False, False, BN, BK, GPS, GROUP_, CM, PRE)
            if SYNC:
                if PRE:
                    d0, _d = first_chunk(pid, wd_ptr, H, D, swd, False, BN, BK)
                grid_sync(bar_ptr + 3, flag_ptr, x_ptr, D, programs, MAX_SPIN_)
        if PH0 <= 4 and PH1 > 4:  # down projection, added into x
            if PRE and not SYNC:
                d0, _d = first_chunk(pid, wd_ptr, H, D, swd, False, BN, BK)
            for t in range(pid, tl.cdiv(D, BN), programs):
                gemv_tile(t, 1.0, h_ptr, h_ptr, wd_ptr, sd_ptr, ld_ptr, h_ptr, x_ptr, x_ptr, H, D, D, swd,
                          d0, d0, t == pid, FMT, False, False, True, False, False, BN, BK, GPS, GROUP_, CM, PRE)


def usable(model: nn.Module) -> bool:
    """decode_gemv's batch-1 path (fused_decode.gemv_usable, checked by the caller) in one kernel a layer: every
    layer's four matmuls in one format, unless MILLIS_NO_DECODE_LAYER=1 (the A/B switch)."""
    if triton is None or env_switch("MILLIS_NO_DECODE_LAYER"):
        return False
    for layer in model.layers:
        fmts = {fmt_of(m) for m in (layer.attn.wqkv, layer.attn.wo, layer.ffn.w13, layer.ffn.w2)}
        if len(fmts) != 1:
            return False
    return True


def sync_state(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's barrier counters (layers, 4) and failure flag (1,), int32 on its device, made once."""
    st = getattr(model, "decode_layer_sync", None)
    if st is None:
        dev = model.tok_emb.weight.device
        st = (torch.zeros(len(model.layers), 4, dtype=torch.int32, device=dev),
              torch.zeros(1, dtype=torch.int32, device=dev))
        model.decode_layer_sync = st
    return st


def failed(model: nn.Module) -> bool:
    """Whether a barrier gave up since the state was made (the grid was not all resident): a host sync."""
    st = getattr(model, "decode_layer_sync", None)
    return st is not None and bool(st[1].item())


def _packed(lin: nn.Module, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, scale, low) of an nn.Linear or a WeightOnlyLinear, `fallback` where a format has none."""
    if fmt_of(lin) == "plain":
        return lin.weight, fallback, fallback
    low = getattr(lin, "low", None)
    return lin.q, lin.scale, low if low is not None else fallback


def tune_key(fmt: str, dtype: torch.dtype, D: int, H: int, nqkv: int) -> tuple:
    """TUNED's key: the weights' format, the activations' dtype (fp32's registers may not fit a WIDE config that
    bf16's do: its barriers would then spin), the model's width, its FFN's and the qkv rows."""
    return fmt, dtype_name(dtype), D, H, nqkv


def programs(dev: torch.device, per_sm: int = 1) -> int:
    """per_sm programs an SM on CUDA (all resident at once: the barrier's condition); 3 elsewhere (the
    interpreter's tests then see programs with several tiles and programs with none)."""
    return torch.cuda.get_device_properties(dev).multi_processor_count * per_sm if dev.type == "cuda" else 3


def layer_step(x: torch.Tensor, layer: nn.Module, index: int, model: nn.Module, pos: torch.Tensor, kv_len: int,
               window: int, config: dict | None = None) -> None:
    """Layer `index` of a batch-1 step on x (D,), the residual stream (updated in place), at position pos (1,):
    its key and value written into slot 0 of the layer's cache."""
    a, f, c = layer.attn, layer.ffn, model.config
    fmt = fmt_of(a.wqkv)
    D, H, hs = x.shape[0], f.w13.out_features // 2, a.hs
    nqkv = a.wqkv.out_features
    qkv = torch.empty(nqkv, device=x.device, dtype=x.dtype)
    o = torch.empty(a.nh * hs, device=x.device, dtype=x.dtype)
    h = torch.empty(H, device=x.device, dtype=x.dtype)
    bars, flag = sync_state(model)
    wq, sq, lq = _packed(a.wqkv, x)
    wo, so, lo = _packed(a.wo, x)
    wu, su, lu = _packed(f.w13, x)
    wd, sd, ld = _packed(f.w2, x)
    cfg = {**DEFAULT, **(TUNED.get(tune_key(fmt, x.dtype, D, H, nqkv), {}) if config is None else config)}
    g = a.nh // a.nkv
    sync = x.is_cuda
    grid = (programs(x.device, cfg["per_sm"]),)
    for ph0, ph1 in ((0, PHASES),) if sync else [(i, i + 1) for i in range(PHASES)]:
        _layer_kernel[grid](
            x, qkv, o, h, pos, model.cos, model.sin, a.cache.k, a.cache.v,
            layer.attn_norm.weight, wq, sq, lq, a.wqkv.bias if a.wqkv.bias is not None else x, wo, so, lo,
            layer.ffn_norm.weight, wu, su, lu, wd, sd, ld, bars[index], flag,
            D, H, nqkv, a.nh, a.nkv, a.cache.k.shape[2], kv_len, window, hs ** -0.5, c.norm_eps,
            wq.stride(0), wo.stride(0), wu.stride(0), wd.stride(0),
            FMT=FORMATS[fmt], HAS_B=a.wqkv.bias is not None, G=g, GP=max(16, triton.next_power_of_2(g)), HS=hs,
            BL=64, PREC="ieee" if x.dtype == torch.float32 else "tf32", BN=cfg["BN"], BK=cfg["BK"],
            GPS=cfg["GPS"], GROUP_=GROUP, PH0=ph0, PH1=ph1, SYNC=sync, CM=".cg" if sync else "",
            MAX_SPIN_=MAX_SPIN, PROGS=grid[0], PRE=fmt != "int4", num_warps=cfg["num_warps"], **pdl_launch(x, True))


def scratch_row(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For timing a batch-1 step's layers: a random residual row x0 (D,), a copy x to step in place (from x0
    again each call: the residual adds would otherwise accumulate), and the scratch position (1,), the
    cache's last, which no request reaches."""
    w = model.tok_emb.weight
    x0 = torch.randn(w.shape[1], device=w.device, dtype=w.dtype) * 0.1
    pos = torch.full((1,), model.layers[0].attn.cache.k.shape[2] - 1, dtype=torch.long, device=w.device)
    return x0, x0.clone(), pos


def tune(model: nn.Module, kv_len: int, window: int) -> dict:
    """Time the candidates on layer 0 at the scratch position (the last of the cache, which no request
    reaches), keep the fastest in TUNED and return {key: [(config, us), ...]}, fastest first."""
    layer = model.layers[0]
    a = layer.attn
    w = model.tok_emb.weight  # scratch_row's x: the model's dtype, as layer_step's key reads it
    key = tune_key(fmt_of(a.wqkv), w.dtype, w.shape[1], layer.ffn.w13.out_features // 2, a.wqkv.out_features)
    if key in TUNED:
        return {}
    x0, x, pos = scratch_row(model)
    bars = sync_state(model)[0]

    def run(cand: dict) -> None:  # from the same x each time: the residual adds would otherwise accumulate
        x.copy_(x0)
        bars.zero_()
        layer_step(x, layer, 0, model, pos, kv_len, window, cand)

    timed = time_candidates(CANDIDATES, run)
    if not timed or failed(model):  # the caller drops the layer kernel
        return {}
    flag = sync_state(model)[1]
    wide = []
    for cand in WIDE:  # one launch first: two programs an SM that do not all fit give up their barriers, and
        run(cand)      # timing them would spin MAX_SPIN polls a barrier, a hundred times over
        torch.cuda.synchronize()
        if failed(model):
            flag.zero_()
            continue
        wide += time_candidates([cand], run)
    timed = sorted(timed + wide, key=lambda cu: cu[1])
    TUNED[key] = timed[0][0]
    return {key: timed}


def compiled_ptx() -> list[str]:
    """decode_gemv.ptx_of the layer kernel."""
    return ptx_of(_layer_kernel) if triton is not None else []
