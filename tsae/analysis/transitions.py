"""Lagged transitions between SAE features: does B fire k tokens after A more often than chance?

Input: binarised codes `active [n_seq, T, F]` (bool, or codes with active = code > 0), restricted to
the N most frequent features (or a given list).  The event indicator e[s, t, f] is

    events="active":  e = active                                  ("A on at t, B on at t+k")
    events="onset":   e = active[t] & ~active[t-1]  (t=0 counts)  ("B starts k tokens after A starts")

Observed count at lag k >= 1:

    C_k(A, B) = sum_s sum_{t < T-k} e[s, t, A] e[s, t+k, B]

Null (shuffled positions): the positions of each sequence are permuted by an independent uniform
random permutation, the same one for all features, so each sequence keeps its per-feature counts
and its same-position co-occurrences while order is destroyed.  The pair (t, t+k) then lands on a
uniform ordered pair of distinct positions, so the null expectation is exact:

    E_k(A, B) = sum_s (T - k) / (T (T - 1)) * (n_s(A) n_s(B) - c_s(A, B))
    n_s(A) = sum_t e[s, t, A],   c_s(A, B) = sum_t e[s, t, A] e[s, t, B]

lift = C / E.  Test (one-sided, for C > E), p = max(p_poisson, p_seq):

    p_poisson = P(Pois(E) >= C)        exact-ish for sparse, unclumped events; but when A and B
                                       come in runs (persistent features) pair events arrive in
                                       clumps and the Poisson variance is far too small;
    p_seq     = 1 - Phi(sum_g D_g / sqrt(sum_g D_g^2)),   D_g = C_g - E_g per group g of
                                       contiguous sequences (n_groups ~ 100): a cluster-robust,
                                       self-normalised z-test.  Groups of sequences are independent
                                       units, so clumping inside them (and dependence between
                                       neighbouring sequences of one document) is accounted for.

Taking the max keeps a pair only when both agree (conservative).  q = Benjamini-Hochberg over the
family of all off-diagonal (A, B, k) tests.  The diagonal A == B (persistence, recurrence) is a
separate family, reported by `persistence()`.  With events="active", two features that co-occur and
persist together also show lagged association; events="onset" isolates "B starts after A starts".

Counts accumulate per group as float32 products X_k^T Y_k of [tokens, N] indicator matrices
(exact integers while a group holds < 2^24 tokens), summed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm, poisson

EVENTS = ("active", "onset")


@dataclass(frozen=True)
class Transition:
    A: int  # feature id (in the full dictionary)
    B: int
    k: int  # lag in tokens
    count: int
    expected: float
    lift: float
    p: float
    q: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TransitionStats:
    features: np.ndarray  # int [N], dictionary ids of the analysed features
    lags: tuple[int, ...]
    count: np.ndarray  # int64 [K, N, N]: count[i, a, b] = C_{lags[i]}(features[a], features[b])
    expected: np.ndarray  # float64 [K, N, N]
    p: np.ndarray  # float64 [K, N, N]
    q: np.ndarray  # float64 [K, N, N]; BH within the off-diagonal family and within the diagonal
    n_seq: int
    seq_len: int
    events: str

    @property
    def lift(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.expected > 0, self.count / self.expected, np.nan)

    def _rows(self, mask: np.ndarray, n: int) -> list[Transition]:
        lift = self.lift
        idx = np.argwhere(mask)
        order = np.lexsort((-self.count[mask], -lift[mask]))[:n]  # by lift, then count
        out = []
        for i, a, b in idx[order]:
            out.append(Transition(
                A=int(self.features[a]), B=int(self.features[b]), k=int(self.lags[i]),
                count=int(self.count[i, a, b]), expected=float(self.expected[i, a, b]),
                lift=float(lift[i, a, b]), p=float(self.p[i, a, b]), q=float(self.q[i, a, b])))
        return out

    def _significant(self, alpha: float, min_count: int) -> np.ndarray:
        return (self.q <= alpha) & (self.count >= min_count) & (self.count > self.expected)

    def top(self, n: int = 20, alpha: float = 0.05, min_count: int = 5) -> list[Transition]:
        """Significant A -> B transitions (A != B), highest lift first."""
        off = ~np.eye(len(self.features), dtype=bool)[None]
        return self._rows(self._significant(alpha, min_count) & off, n)

    def persistence(self, n: int = 20, alpha: float = 0.05, min_count: int = 5) -> list[Transition]:
        """Significant A -> A (the diagonal), highest lift first."""
        diag = np.eye(len(self.features), dtype=bool)[None]
        return self._rows(self._significant(alpha, min_count) & diag, n)

    def significant_lags(self, A: int, B: int, alpha: float = 0.05, min_count: int = 1) -> list[int]:
        a, b = self.position(A), self.position(B)
        sig = self._significant(alpha, min_count)[:, a, b]
        return [k for k, s in zip(self.lags, sig, strict=True) if s]

    def position(self, feature: int) -> int:
        hit = np.flatnonzero(self.features == feature)
        if not len(hit):
            raise KeyError(f"feature {feature} was not among the analysed features")
        return int(hit[0])


def onsets(active: np.ndarray) -> np.ndarray:
    """Births along axis 1: active at t and not at t-1 (t = 0 counts when active)."""
    prev = np.zeros_like(active)
    prev[:, 1:] = active[:, :-1]
    return active & ~prev


def _events(block: np.ndarray, events: str) -> np.ndarray:
    block = block if block.dtype == bool else block > 0
    return onsets(block) if events == "onset" else block


def most_frequent(active: np.ndarray, top_n: int) -> np.ndarray:
    """Ids of the top_n most often active features (ties by id), most frequent first; never-active dropped."""
    freq = np.asarray(active if active.dtype == bool else active > 0).sum(axis=(0, 1))
    order = np.lexsort((np.arange(len(freq)), -freq))[:top_n]
    return order[freq[order] > 0]


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of a flat family."""
    p = np.asarray(p, dtype=np.float64).ravel()
    m = len(p)
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    out = np.empty(m)
    out[order] = q
    return out


def _check(active: np.ndarray, lags: Sequence[int], events: str) -> tuple[int, int, int]:
    if active.ndim != 3:
        raise ValueError(f"expected active [n_seq, T, F], got shape {active.shape}")
    n_seq, T, F = active.shape
    if events not in EVENTS:
        raise ValueError(f"events must be one of {EVENTS}, got {events!r}")
    if not lags or min(lags) < 1 or max(lags) >= T:
        raise ValueError(f"lags must lie in 1..{T - 1}, got {tuple(lags)}")
    return n_seq, T, F


def mine_transitions(active: np.ndarray, lags: Sequence[int] = (1, 2, 3, 4), *, top_n: int = 512,
                     features: Sequence[int] | None = None, events: str = "active",
                     n_groups: int = 100) -> TransitionStats:
    """Counts, shuffled-position expectations, lifts, p and BH q for every (A, B, k).

    Sequences are processed in `n_groups` contiguous groups (the units of the clustered test); cost
    ~ 2 (K + 1) n_tokens N^2 flops in float32 GEMMs, memory ~ one group's [tokens, N] block.
    """
    lags = tuple(int(k) for k in lags)
    n_seq, T, _ = _check(active, lags, events)
    feats = np.asarray(features if features is not None else most_frequent(active, top_n), dtype=np.int64)
    N, K = len(feats), len(lags)
    scale = [(T - k) / (T * (T - 1)) for k in lags]
    count, expected, var = (np.zeros((K, N, N)) for _ in range(3))
    for group in np.array_split(np.arange(n_seq), min(n_groups, n_seq)):
        e = _events(np.asarray(active[group[0]:group[-1] + 1])[..., feats], events).astype(np.float32)
        flat = e.reshape(-1, N)
        n_s = e.sum(axis=1, dtype=np.float64)  # [c, N] per-sequence event counts
        null_pairs = n_s.T @ n_s - (flat.T @ flat)  # sum_s n_s(A) n_s(B) - c_s(A, B)
        for i, k in enumerate(lags):
            c_g = (e[:, : T - k].reshape(-1, N).T @ e[:, k:].reshape(-1, N)).astype(np.float64)
            e_g = scale[i] * null_pairs
            count[i] += c_g
            expected[i] += e_g
            var[i] += np.square(c_g - e_g)

    count = np.rint(count).astype(np.int64)
    expected = np.clip(expected, 0.0, None)
    p_poisson = np.where(expected > 0, poisson.sf(count - 1, np.maximum(expected, 1e-300)),
                         np.where(count > 0, 0.0, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, (count - expected) / np.sqrt(var), 0.0)
    p = np.maximum(p_poisson, norm.sf(z))
    q = np.empty_like(p)
    diag = np.broadcast_to(np.eye(N, dtype=bool), p.shape)
    q[~diag] = bh_qvalues(p[~diag])
    q[diag] = bh_qvalues(p[diag])
    return TransitionStats(features=feats, lags=lags, count=count, expected=expected, p=p, q=q,
                           n_seq=n_seq, seq_len=T, events=events)


def permutation_counts(active: np.ndarray, features: Sequence[int], lags: Sequence[int] = (1, 2, 3, 4), *,
                       events: str = "active", n_perm: int = 20, seed: int = 0) -> np.ndarray:
    """Mean C_k over `n_perm` draws of the shuffled-position null, float [K, N, N] (checks `expected`).

    Events are computed first and then shuffled, matching the null of `mine_transitions`.
    """
    lags = tuple(lags)
    n_seq, T, _ = _check(active, lags, events)
    e = _events(np.asarray(active)[..., np.asarray(features)], events).astype(np.float32)
    rng = np.random.default_rng(seed)
    total = np.zeros((len(lags), e.shape[-1], e.shape[-1]))
    for _ in range(n_perm):
        perm = np.argsort(rng.random((n_seq, T)), axis=1)
        shuffled = np.take_along_axis(e, perm[..., None], axis=1)
        for i, k in enumerate(lags):
            x, y = shuffled[:, : T - k].reshape(-1, e.shape[-1]), shuffled[:, k:].reshape(-1, e.shape[-1])
            total[i] += x.T @ y
    return total / n_perm


def example_contexts(active: np.ndarray, tokens_decoded: Sequence[Sequence[str]], A: int, B: int, k: int,
                     n: int = 3, width: int = 8, *, events: str = "active",
                     marks: tuple[str, str, str, str] = ("[[", "]]", "{{", "}}")) -> list[dict]:
    """Up to n corpus snippets where A (marked [[..]]) is followed by B (marked {{..}}) k tokens later.

    Snippets come from distinct sequences first; each is {"seq", "t", "text"} with `width` tokens of
    context either side.  `tokens_decoded[s][t]` is the decoded string of token t of sequence s.
    """
    n_seq, T, _ = _check(active, (k,), events)
    src = _events(np.asarray(active[:, :, [A]]), events)[..., 0]
    dst = _events(np.asarray(active[:, :, [B]]), events)[..., 0]
    hits = np.argwhere(src[:, : T - k] & dst[:, k:])
    _, first = np.unique(hits[:, 0], return_index=True)
    rest = np.setdiff1d(np.arange(len(hits)), first)
    chosen = hits[np.concatenate([np.sort(first), rest])[:n]]
    out = []
    for s, t in chosen:
        toks = list(tokens_decoded[s])
        lo, hi = max(0, t - width), min(T, t + k + width + 1)
        pieces = []
        for j in range(lo, hi):
            tok = str(toks[j]).replace("\n", "\\n")
            if j == t:
                tok = f"{marks[0]}{tok}{marks[1]}"
            elif j == t + k:
                tok = f"{marks[2]}{tok}{marks[3]}"
            pieces.append(tok)
        text = ("…" if lo > 0 else "") + "".join(pieces) + ("…" if hi < T else "")
        out.append({"seq": int(s), "t": int(t), "text": text})
    return out
