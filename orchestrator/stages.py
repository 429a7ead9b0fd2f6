"""The two Ray Data stages of a labelling job: voting, then the controller for hard rows.

Both are callables over pandas batches, run in actor pools (``compute=ActorPoolStrategy``). The
vote stage sends each batch whole to every specialist's Serve deployment (caller-side batching is
8-10x faster than Serve batching single items here) and applies the voting rule. The controller
stage asks the LLM only about the hard rows, with k-nearest seed rows as demonstrations, bounded
concurrency and a call/token budget; every other row passes through untouched.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from labelwright.cluster.deploy import predict_all
from labelwright.orchestrator.acquisition import nearest
from labelwright.orchestrator.budget import BUDGET_KEPT, BUDGET_SPENT, Budget
from labelwright.orchestrator.voting import (
    Stack, Votes, combine_logits, combined_label, controller_probs, gated, get_rule, mean_probs, merged_shortlist,
    top_candidates,
)


DOUBT_WINDOW = 20000  # hard rows whose vote confidence the budget's selection compares a row with
DEMONSTRATION_ENCODER = "minilm"  # what the controller's demonstrations are found with (the bank's embeddings)


def demonstration_embeddings(controller: dict) -> str | None:
    """``VoteSettings.embeddings_of`` for a controller (its config as a dict): the demonstration encoder's key where
    the controller is shown demonstrations, else None."""
    from labelwright.specialists.encoder import encoder_key

    return encoder_key(DEMONSTRATION_ENCODER) if int(controller.get("num_demonstrations") or 0) > 0 else None


@dataclass(frozen=True)
class VoteSettings:
    labels: list[str]
    endpoints: dict  # name -> SpecialistEndpoint
    rule: str = "unanimity"
    threshold: float | None = None
    weights: dict[str, float] | None = None
    calibrated: bool = False  # thresholds (and a stacked rule's weights) per specialist versions come from the StageGate
    max_chars: int = 20000
    candidates_k: int = 12
    # The controller's demonstration encoder (``encoder_key``): a specialist that embeds with it sends the hard
    # rows' embeddings along, and the controller stage finds their demonstrations without encoding them again.
    embeddings_of: str | None = None


def vote_columns(names: Sequence[str]) -> list[str]:
    cols = []
    for n in names:
        cols += [f"vote_{n}", f"prob_{n}", f"version_{n}"]
    return cols + ["specialists_label", "vote_confidence", "hard", "shortlist", "combine_logits", "combine_weight",
                   "embedding"]


# Carried from the vote stage to the controller stage only, never written out.
INTERNAL_COLUMNS = ["hard", "shortlist", "vote_confidence", "combine_logits", "combine_weight", "embedding"]


def combined_decision(logits, weight: float, answer: str, confidence, labels: Sequence[str]) -> tuple[str, float]:
    """The label and probability the combination gives a row: the specialists' part of its logits (what the
    vote stage computed), its weight on the controller, and the controller's ``answer`` with its ``confidence``."""
    ctrl = controller_probs([answer], [confidence], labels)[0]
    k, p = combined_label(np.asarray(logits, dtype=np.float64), float(weight), ctrl)
    return labels[k], p


class VoteStage:
    """``gate``: the StageGate actor with the stages' calibrated thresholds and fits (a job); ``fits``: the same
    lookup as a plain function of the voters' versions (``learning.fits_for``; a service of a finished run).
    ``handles``: the specialists' Serve handles by name, where the caller holds them already (an application's
    own deployments); else each endpoint of ``settings`` gives its handle."""

    def __init__(self, settings: VoteSettings, gate=None, *, handles: dict | None = None, fits=None):
        self.s = settings
        self.gate = gate if settings.calibrated else None  # StageGate actor with the calibrated thresholds
        self.fits = fits if settings.calibrated else None
        self.names = list(settings.endpoints)
        self.handles = dict(handles) if handles is not None else {n: ep.handle() for n, ep in settings.endpoints.items()}
        self.rule = get_rule(settings.rule)
        self.weights = np.array([(settings.weights or {}).get(n, 1.0) for n in self.names])
        self.rule_kwargs = {} if settings.threshold is None else {"threshold": settings.threshold}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True)
        n = len(batch)
        active = np.flatnonzero(batch["skip_reason"].isna().to_numpy())
        texts = [batch.at[i, "text"][: self.s.max_chars] for i in active]
        out = {c: [None] * n for c in vote_columns(self.names)}
        out["hard"] = [False] * n
        if len(active):
            options = {"embeddings_of": self.s.embeddings_of} if self.s.embeddings_of else {}
            results = predict_all(self.handles, texts, **options)
            probs = np.stack([results[name]["probs"] for name in self.names])  # (S, A, L)
            votes, combine = self._votes(probs, {name: results[name]["version"] for name in self.names})
            avg = mean_probs(probs, self.weights)
            cands = top_candidates(avg, self.s.candidates_k)
            labels = self.s.labels
            for s_idx, name in enumerate(self.names):
                top = probs[s_idx].argmax(1)
                top_p = probs[s_idx][np.arange(len(active)), top]
                version = results[name]["version"]
                for j, i in enumerate(active):
                    out[f"vote_{name}"][i] = labels[top[j]]
                    out[f"prob_{name}"][i] = float(top_p[j])
                    out[f"version_{name}"][i] = version
            for j, i in enumerate(active):
                out["specialists_label"][i] = labels[votes.leading[j]]
                out["vote_confidence"][i] = float(votes.confidence[j])
                out["hard"][i] = bool(votes.hard[j])
                out["shortlist"][i] = [labels[c] for c in cands[j]]
            embedded = next((r["embeddings"] for r in results.values() if r.get("embeddings") is not None), None)
            if embedded is not None:  # as bytes: one Arrow binary value per hard row, None elsewhere
                for j in np.flatnonzero(votes.hard):
                    out["embedding"][active[j]] = embedded[j].tobytes()
            if combine is not None:  # the specialists' part of the combination, for the rows the controller answers
                stack = Stack.from_dict(combine["stack"])
                hard = np.flatnonzero(votes.hard)
                logits = combine_logits(probs[:, hard], stack)
                for j, z in zip(hard, logits):
                    out["combine_logits"][active[j]] = [float(x) for x in z]
                    out["combine_weight"][active[j]] = float(stack.a[-1])
        for c, values in out.items():
            batch[c] = values
        return batch

    def _votes(self, probs: np.ndarray, versions: dict[str, str]) -> tuple[Votes, dict | None]:
        """The rule's votes, and the stage's combination of the controller with the specialists when its
        check fitted one that pays (``voting.combine``), else None."""
        if self.gate is not None or self.fits is not None:
            if self.fits is not None:
                known, threshold, fitted = self.fits(versions)
            else:
                import ray

                known, threshold, fitted = ray.get(self.gate.threshold_for.remote(versions))
            if known:
                fitted = fitted or {}
                extra = {"stack": Stack.from_dict(fitted["stack"])} if fitted.get("stack") else {}
                combine = fitted.get("combine")
                votes = gated(self.rule(probs, weights=self.weights, threshold=0.0, **extra), threshold)
                return votes, combine if combine and combine.get("applied") else None
        return self.rule(probs, weights=self.weights, **self.rule_kwargs), None


@dataclass
class ControllerSettings:
    controller: dict  # ControllerConfig as a dict, base_url resolved
    labels: list[str]
    descriptions: dict[str, str]
    instruction: str
    demo_texts: list[str]
    demo_labels: list[str]
    demo_embeddings: np.ndarray | None
    encoder_model: str = DEMONSTRATION_ENCODER
    seed_answers: dict = field(default_factory=dict)  # row id -> answer dict for rows labelled while seeding
    reference_answers: dict = field(default_factory=dict)  # row id -> answer dict for the reference rows
    # What the controller may spend while labelling: a Budget, or the Ray actor of one that several controller
    # actors share (budget.shared_budget); None: no limit.
    budget: Any = None
    endpoint_down_after: int | None = 16  # consecutive endpoint failures that stop the job (None: never)


RESULT_COLUMNS = ["label", "decided_by", "reason", "retryable", "confidence", "controller_label",
                  "controller_answer", "controller_confidence",
                  "candidates", "prompt_tokens", "completion_tokens", "llm_calls", "cached", "seed", "reference"]


def ask_again(answer: dict) -> bool:
    """An answer bought up front (seed, reference) that failed for a reason that may pass: the row goes the way
    of any other row (voted; asked again if hard) instead of keeping the failure."""
    return answer.get("label") is None and bool(answer.get("retryable"))


class ControllerStage:
    def __init__(self, settings: ControllerSettings):
        from labelwright.orchestrator.controller import Controller, ControllerConfig

        self.s = settings
        config = ControllerConfig(**settings.controller)
        self.config = config
        self.controller = Controller(config, labels=settings.labels, descriptions=settings.descriptions,
                                     instruction=settings.instruction)
        self.demonstrating = (config.num_demonstrations > 0 and settings.demo_embeddings is not None
                              and len(settings.demo_texts) > 0)
        self.budget = settings.budget if settings.budget is not None else Budget()
        self.down_streak = 0  # consecutive rows lost to a failing endpoint
        self._encoder = None  # an encoder given (tests); None: the process's shared one, loaded on first use
        # 1 - vote confidence of the latest hard rows (the budget's selection; a window, as a stage swap changes
        # the confidences' scale)
        self.doubts: deque[float] = deque(maxlen=DOUBT_WINDOW)
        # Ray Data may run several batches in this actor at once (runtime.controller_batches): one slow batch
        # then holds up no other. The budget (when it lives here) and the counters above are shared between them.
        self._lock = threading.RLock()
        self._encoding = threading.Lock()  # the label embeddings below are computed once, by one batch
        self._label_embeddings: np.ndarray | None = None  # the labels' verbalisations, encoded on first use

    def _spend(self, method: str, *args, wait: bool = True):
        """Call the budget's ``method``, here or on the budget's own actor (``wait=False``: without waiting for it;
        Ray runs one caller's calls to an actor in the order they were made)."""
        if isinstance(self.budget, Budget):
            with self._lock:
                return getattr(self.budget, method)(*args)
        import ray

        ref = getattr(self.budget, method).remote(*args)
        return ray.get(ref) if wait else None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True)
        n = len(batch)
        res = {c: [None] * n for c in RESULT_COLUMNS}
        res.update(prompt_tokens=[0] * n, completion_tokens=[0] * n, llm_calls=[0] * n,
                   cached=[False] * n, seed=[False] * n, reference=[False] * n, retryable=[False] * n)
        ask: list[int] = []
        earlier: dict[int, dict] = {}  # rows whose answer bought up front failed and that are asked again
        for i in range(n):
            row_id = batch.at[i, "id"]
            stored, flag = self.s.seed_answers.get(row_id), "seed"
            if stored is None:  # asked up front to measure routing on
                stored, flag = self.s.reference_answers.get(str(row_id)), "reference"
            if stored is not None and not ask_again(stored):
                self._fill(res, i, stored)
                res[flag][i] = True
                continue
            if stored is not None:
                earlier[i] = stored
            if isinstance(batch.at[i, "skip_reason"], str):
                res["decided_by"][i] = "unresolved"
                res["reason"][i] = batch.at[i, "skip_reason"]
            elif not batch.at[i, "hard"]:
                res["label"][i] = batch.at[i, "specialists_label"]
                res["decided_by"][i] = "consensus"
                res["confidence"][i] = batch.at[i, "vote_confidence"]
            else:
                ask.append(i)
        ask = self._worth_asking(batch, n, ask, res)
        if ask:
            self._ask(batch, ask, res)
        for i, a in earlier.items():  # the row carries what was spent on it up front too
            for col, key in (("llm_calls", "calls"), ("prompt_tokens", "prompt_tokens"),
                             ("completion_tokens", "completion_tokens")):
                res[col][i] += int(a.get(key) or 0)
        for c, values in res.items():
            batch[c] = values
        return batch.drop(columns=[c for c in INTERNAL_COLUMNS if c in batch.columns])

    def _worth_asking(self, batch: pd.DataFrame, n: int, rows: list[int], res: dict) -> list[int]:
        """The hard ``rows`` of a batch of ``n`` the budget is spent on: all of them while it lasts for every hard
        row expected; else those whose vote is least confident (stream-based selective sampling: a row is asked
        when its doubt, 1 - vote confidence, is above the quantile of the hard rows this actor has seen that the
        budget left covers). The others are unresolved and retryable."""
        outlook = self._spend("outlook", n, len(rows))
        if outlook is None or not rows:
            return rows
        conf = batch["vote_confidence"] if "vote_confidence" in batch.columns else pd.Series(np.nan, batch.index)
        doubt = [1.0 - float(c) if pd.notna(c) else 1.0 for c in conf.iloc[rows]]
        with self._lock:
            self.doubts.extend(doubt)
            left, demand = outlook
            if demand <= left or left <= 0:  # enough for all; or none left, which _ask says
                return rows
            share = left / demand
            cut = float(np.quantile(self.doubts, 1.0 - share))
        keep = [i for i, d in zip(rows, doubt) if d >= cut]
        for i, d in zip(rows, doubt):
            if d < cut:
                res["decided_by"][i] = "unresolved"
                res["reason"][i] = (f"{BUDGET_KEPT} (budget.max_llm_calls: it covers the "
                                    f"{share:.0%} least confident hard rows, vote confidence under {1 - cut:.2f}; "
                                    f"this row's is {1 - d:.2f})")
                res["retryable"][i] = True
        return keep

    def _ask(self, batch: pd.DataFrame, rows: list[int], res: dict) -> None:
        """Ask the controller about ``rows``, all of them at once on its bounded pool: a slow or failing row
        holds one thread, not the rows behind it. The budget is checked as each row starts (``Budget.admit``)."""
        texts = [batch.at[i, "text"] for i in rows]
        embedded = [batch.at[i, "embedding"] for i in rows] if "embedding" in batch.columns else None
        demos, choices = self.prompt_parts(texts, [list(batch.at[i, "shortlist"]) for i in rows], embedded)
        started: set[int] = set()

        def admit(j: int) -> str | None:
            stop = self._spend("admit")
            if stop is None:
                started.add(j)
            return stop

        def done(j: int, answer) -> None:
            self._spend("settle", j in started, answer.calls, answer.prompt_tokens, answer.completion_tokens,
                        wait=False)
            with self._lock:
                self._check_endpoint_alive(answer)

        answers = self.controller.label_many(texts, demonstrations=demos, choices=choices, admit=admit, on_done=done)
        for i, a in zip(rows, answers):
            self._fill(res, i, a.model_dump())
            self._combine(batch, i, res)

    def _check_endpoint_alive(self, answer) -> None:
        """Stop the job (finished shards stay saved) rather than mark every remaining hard row
        unresolved when the endpoint has died: rows marked unresolved would not be asked again on resume."""
        self.down_streak = self.down_streak + 1 if answer.endpoint_down else 0
        if self.s.endpoint_down_after and self.down_streak >= self.s.endpoint_down_after:
            from labelwright.specialists.errors import ControllerError

            raise ControllerError(
                f"the controller endpoint failed on {self.down_streak} rows in a row ({answer.reason}); stopping. "
                "Finished shards are saved: fix the endpoint and run the same command again to resume (add "
                "--retry-unresolved to ask again the rows the outage left unresolved in shards that finished)"
            )

    def prompt_parts(self, texts: list[str], offered: list[list[str]] | None, embedded: list | None = None):
        """Each text's demonstrations and, on a task with more than ``max_choices`` labels, the labels its prompt
        offers (``offered``: the specialists' ranking); the texts are embedded once for both."""
        many = offered is not None and len(self.s.labels) > self.config.max_choices
        queries = self._queries(texts, embedded) if texts and (many or self.demonstrating) else None
        return (self.demonstrations(texts, queries=queries),
                self.choices(texts, offered, queries=queries) if many else None)

    def demonstrations(self, texts: list[str], embedded: list | None = None, *,
                       queries: np.ndarray | None = None) -> list[list[tuple[str, str]]] | None:
        """The nearest demonstrations for each text; ``embedded``: the texts' embeddings (float32 bytes) where the
        vote stage had them from a specialist (None where not): only the others are encoded here. ``queries``: the
        texts' embeddings already at hand (``_queries``)."""
        if not self.demonstrating:
            return None
        if queries is None:
            queries = self._queries(texts, embedded)
        idx = nearest(queries, self.s.demo_embeddings, self.config.num_demonstrations,
                      query_texts=list(texts), bank_texts=self.s.demo_texts)
        # most similar last: closest to the question in the prompt
        return [[(self.s.demo_texts[j], self.s.demo_labels[j]) for j in row[::-1]] for row in idx]

    def choices(self, texts: list[str], offered: list[list[str]] | None, embedded: list | None = None, *,
                queries: np.ndarray | None = None) -> list[list[str]]:
        """The labels each text's prompt offers on a task with more than ``max_choices``: the specialists' top half
        (``offered``, their ranking; None: none), then the labels whose verbalisation is nearest the text
        (``voting.merged_shortlist``). The specialists' top labels alone miss the true label most where they know
        least: the hard rows, before they have learned many labels."""
        from labelwright.orchestrator.bootstrap import verbalise

        if not texts:
            return []
        q = self._queries(texts, embedded) if queries is None else queries
        with self._encoding:
            if self._label_embeddings is None:
                self._label_embeddings = self.encoder.encode(
                    [verbalise(lab, self.s.descriptions.get(lab)) for lab in self.s.labels])
        k, index = self.config.max_choices, {lab: j for j, lab in enumerate(self.s.labels)}
        model = None if offered is None else [[index[lab] for lab in row] for row in offered]
        near = top_candidates(q @ self._label_embeddings.T, k)
        return [[self.s.labels[j] for j in row] for row in merged_shortlist(model, near, k)]

    def _queries(self, texts: list[str], embedded: list | None) -> np.ndarray:
        """The texts' embeddings by the demonstration encoder: those the vote stage handed over (float32 bytes), the
        others encoded here. Anything but bytes (None; a null that came through Arrow some other way) is encoded."""
        given = [e if isinstance(e, (bytes, bytearray)) else None for e in (embedded or [None] * len(texts))]
        missing = [j for j, e in enumerate(given) if e is None]
        rows = [np.frombuffer(e, dtype=np.float32) if e is not None else None for e in given]
        if missing:
            encoded = self.encoder.encode([texts[j] for j in missing])  # the encoder locks its own encode
            for j, vec in zip(missing, encoded):
                rows[j] = vec
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)

    @property
    def encoder(self):
        """The process's shared encoder of the demonstrations' model (loaded once, whichever batch asks first)."""
        from labelwright.specialists.encoder import shared_encoder

        return self._encoder if self._encoder is not None else shared_encoder(self.s.encoder_model)

    def _combine(self, batch: pd.DataFrame, i: int, res: dict) -> None:
        """Where the stage fitted a combination that pays (``voting.combine``), it decides the row from the
        controller's answer and the specialists' votes: a different label than the controller's is
        ``decided_by: combined`` (the controller's own stays in ``controller_label``)."""
        logits = batch.at[i, "combine_logits"] if "combine_logits" in batch.columns else None
        if logits is None or res["decided_by"][i] != "controller":
            return
        label, p = combined_decision(logits, batch.at[i, "combine_weight"], res["label"][i],
                                     res["controller_confidence"][i], self.s.labels)
        if label != res["label"][i]:
            res["label"][i], res["decided_by"][i], res["confidence"][i] = label, "combined", p

    @staticmethod
    def _fill(res: dict, i: int, a: dict) -> None:
        ok = a.get("label") is not None
        res["label"][i] = a.get("label")
        res["decided_by"][i] = "controller" if ok else "unresolved"
        res["controller_label"][i] = a.get("label")
        res["reason"][i] = a.get("reason")
        res["retryable"][i] = bool(a.get("retryable"))
        res["controller_answer"][i] = a.get("raw")
        res["controller_confidence"][i] = a.get("confidence")
        res["candidates"][i] = list(a["candidates"]) if a.get("candidates") else None
        res["confidence"][i] = a.get("confidence")
        res["prompt_tokens"][i] = int(a.get("prompt_tokens") or 0)
        res["completion_tokens"][i] = int(a.get("completion_tokens") or 0)
        res["llm_calls"][i] = int(a.get("calls") or 0)
        res["cached"][i] = bool(a.get("cached"))


class LabelStage:
    """Vote, then ask the controller about the hard rows, in one actor call.

    Used when the specialists learn in stages: as two operators, Ray Data would vote far ahead of
    the (slow) controller, so most rows would be voted before any stage could help them. Here a row
    is voted just before it is routed, and every batch started after a swap uses the new weights.
    """

    def __init__(self, vote: VoteSettings, controller: ControllerSettings, gate=None):
        self.vote = VoteStage(vote, gate)
        self.ask = ControllerStage(controller)
        self.gate = gate  # StageGate actor: holds each batch while a stage trains (stages.wait)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.gate is not None:
            import ray

            ray.get(self.gate.wait.remote())
        return self.ask(self.vote(batch))
