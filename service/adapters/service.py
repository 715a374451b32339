"""The adapter lifecycle: upload with validation and a canary, activation (hot-swap), rollback,
deletion, and keeping every engine in the registry's desired state.

Hot-swap, in order: load the new version (under its own `name@version`) on every engine
that is up, flip the alias, then unload the old version once no request holds it. A
failed load leaves the old version serving. Engines that are down get the new state from
`sync` before they take traffic again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import lzma
import shutil
import tarfile
import time
import uuid
import zipfile
import zlib
from functools import partial
from pathlib import Path
from typing import Any

from anyio import to_thread

from knowledge.errors import CollectionNotFound, InvalidCollectionName
from service.adapters.archive import copy_folder, unpack
from service.adapters.inspection import BaseModelInfo, inspect_adapter
from service.adapters.leases import Lease, Leases
from service.adapters.registry import (
    STAGING, VERSION_CHARS, Adapter, EvalResult, Registry, Version, adapter_key, check_name,
)
from service.adapters.schemas import MAX_EVAL_REPORT_BYTES, MAX_EVAL_SUITES
from service.engine.lora import EngineCallFailed, LoraEndpoints
from service.engine.pool import Engine, EnginePool
from service.errors import (
    ActivationFailed, AdapterConflict, AdapterRejected, EngineUnavailable, InvalidRequest, LimitExceeded,
)
from service.knowledge.service import KnowledgeService
from service.metrics import Metrics
from service.models.catalog import Target
from service.settings import Settings

log = logging.getLogger("lorag.adapters")

# Errors that untrusted archive bytes can raise from the standard library's readers.
_UNREADABLE = (ValueError, EOFError, IndexError, RecursionError, zlib.error, lzma.LZMAError,
               tarfile.TarError, zipfile.BadZipFile)

# The canary compares greedy continuations of these with and without the adapter.
_CANARY_PROMPTS = ("The", "Hello, how are you today?")
_CANARY_TOKENS = 8
# Log-probability difference below which a token counts as unchanged (batching noise is ~1e-6).
_CANARY_TOLERANCE = 1e-3


class AdapterService:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        engines: EnginePool,
        lora: LoraEndpoints,
        base: BaseModelInfo | None,
        metrics: Metrics,
    ):
        self._settings = settings
        self._registry = registry
        self._engines = engines
        self._lora = lora
        self._base = base
        self._metrics = metrics
        self._knowledge: KnowledgeService | None = None  # set once the knowledge base is open
        self.leases = Leases()
        self._changing = asyncio.Lock()  # one registry change (activation, registration, delete) at a time
        self._retiring: set[asyncio.Task] = set()

    @property
    def registry(self) -> Registry:
        return self._registry

    def set_knowledge(self, knowledge: KnowledgeService) -> None:
        """The knowledge base an upload's declared rag.collection is looked up in."""
        self._knowledge = knowledge

    async def close(self) -> None:
        for task in self._retiring:
            task.cancel()

    # Requests

    def hold(self, target: Target) -> Lease | None:
        return self.leases.acquire(target.served) if target.version else None

    async def ensure_loaded(self, target: Target) -> None:
        """Make sure the engines that are up have the target (a pinned, inactive version may not);
        EngineUnavailable only when none of them can serve it."""
        if target.version is None:
            return
        up = self._engines.up()
        missing = [e for e in up if target.served not in e.loaded]
        if missing:
            failures = await self._load_on(missing, target.version)
            if not any(target.served in e.loaded for e in up):
                raise EngineUnavailable(f"{target.served} could not be loaded: {'; '.join(failures)}")

    # Lifecycle

    async def upload(
        self, tenant: str, name: str, archive: bytes | None, path: str | None, activate: bool
    ) -> tuple[Version, bool, dict | None]:
        """Validate, canary-check and register a version of the tenant's adapter `name`;
        (version, created, activation report)."""
        check_name(name)
        if name == self._settings.served_model_name:
            raise InvalidRequest(f"{name!r} is the base model's name; pick another adapter name", param="name")
        if (archive is None) == (path is None):
            raise InvalidRequest("send exactly one of: an archive file, or a path inside your adapters folder")
        if self._base is None:
            raise EngineUnavailable(
                f"adapters cannot be validated: the base model's weights are not readable at "
                f"{self._settings.model_path} (set LORAG_MODEL to a local copy of the served model)"
            )
        staged = self._registry.root / STAGING / uuid.uuid4().hex
        limit = self._settings.max_upload_bytes
        try:
            try:
                if archive is not None:
                    await to_thread.run_sync(unpack, archive, staged, limit)
                else:
                    await to_thread.run_sync(copy_folder, self._inside_area(tenant, path), staged, limit)
                facts = await to_thread.run_sync(
                    inspect_adapter, staged, self._base, self._settings.engine_max_lora_rank
                )
            except _UNREADABLE as exc:
                # The named checks raise AdapterRejected; these are malformed bytes they did not
                # foresee (a doubly compressed tar, an entry named ".", JSON nested too deep).
                raise AdapterRejected(
                    f"the upload could not be read ({exc.__class__.__name__}: {exc}); send a plain .tar.gz "
                    "or .zip of the adapter files", code="unreadable_upload"
                ) from None
            await self._check_collection(tenant, facts.rag, "lorag.json: rag.collection")
            if facts.base_fingerprint is None:  # validated against the served base: record which one
                facts = dataclasses.replace(facts, base_fingerprint=self._base.fingerprint)
            existing = self._registry.find(tenant, name)
            version_id = facts.content_hash[:VERSION_CHARS]
            if existing is None or version_id not in existing.versions:
                # Outside the lock: other adapters' activations do not wait for this engine round trip.
                # Its own engine-side name (the upload's), so two uploads of one version do not collide;
                # the version's own name is only ever loaded from its final path.
                await self._canary(f"{adapter_key(tenant, name)}@{version_id}#canary-{staged.name[:8]}", staged)
            async with self._changing:
                version, created = await self._registry.add(tenant, name, facts, staged)
                log.info("adapter %s %s", version.served, "registered" if created else "already registered")
                report = await self._activate(version) if activate else None
        finally:
            await to_thread.run_sync(partial(shutil.rmtree, staged, ignore_errors=True))
        return version, created, report

    async def activate(
        self, tenant: str, name: str, version: str, rag: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Activate `version`; with `rag`, also set the adapter's retrieval defaults (checked first: an
        unknown collection changes nothing)."""
        async with self._changing:  # resolved inside: a delete may have run while we waited
            target = self._registry.version(tenant, name, version)
            if rag is not None:
                await self._check_collection(tenant, rag, "rag.collection")
            return await self._activate(target, rag)

    async def _activate(self, target: Version, rag: dict[str, Any] | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        name = target.name
        old = self._registry.get(target.tenant, name).active_version()
        previous = old.version if old else None
        if previous == target.version:
            if rag is not None:  # the defaults alone change
                await self._registry.set_rag(self._registry.get(target.tenant, name), rag)
            return self._report(target, previous, started, changed=False)
        with self.leases.acquire(target.served):  # desired while it loads: sync must not unload it
            failures = await self._load_on(self._engines.up(), target)
            if failures:
                self._retire(target.served)
                raise ActivationFailed(
                    f"{target.pinned} was not activated, {name}@{previous or '-'} keeps serving: "
                    + "; ".join(failures)
                )
            await self._registry.set_active(target, rag)
        log.info("adapter %s active (was %s)", target.served, previous or "none")
        if old is not None:
            self._retire(old.served)
        return self._report(target, previous, started, changed=True)

    async def rollback(self, tenant: str, name: str) -> dict[str, Any]:
        previous = self._registry.previous(tenant, name)
        if previous is None:
            raise AdapterConflict(f"adapter {name!r} has no earlier version to roll back to", code="no_previous_version")
        return await self.activate(tenant, name, previous)

    async def set_rag(self, tenant: str, name: str, rag: dict[str, Any] | None) -> Adapter:
        """Set (None: clear) the adapter's retrieval defaults; the next request resolved uses them."""
        async with self._changing:
            adapter = self._registry.get(tenant, name)
            if rag is not None:
                await self._check_collection(tenant, rag, "rag.collection")
            await self._registry.set_rag(adapter, rag)
        log.info("adapter %s retrieval defaults: %s", adapter_key(tenant, name), rag or "none")
        return adapter

    async def store_eval(
        self, tenant: str, name: str, version: str, suite: str, passed: bool, failures: list[str],
        report: dict[str, Any],
    ) -> EvalResult:
        """Store an eval suite's result with a version, replacing the suite's earlier result."""
        size = len(json.dumps(report, ensure_ascii=False).encode())
        if size > MAX_EVAL_REPORT_BYTES:
            raise LimitExceeded(
                f"report is {size} bytes of JSON, more than the limit of {MAX_EVAL_REPORT_BYTES}; store a "
                "summary (scores per cell) and keep the per-answer detail in a file", param="report",
            )
        async with self._changing:  # resolved inside: a delete may have run while we waited
            found = self._registry.version(tenant, name, version)
            if suite not in found.evals and len(found.evals) >= MAX_EVAL_SUITES:
                raise LimitExceeded(
                    f"{found.pinned} already has results for {MAX_EVAL_SUITES} suites, the most a version keeps; "
                    "store this one under the name of a suite it has", param="suite",
                )
            result = await self._registry.store_eval(found, suite, passed, failures, report)
        log.info("adapter %s eval %r stored: %s", found.served, suite, "passed" if passed else "failed")
        return result

    async def delete_version(self, tenant: str, name: str, version: str) -> None:
        async with self._changing:
            found = self._registry.version(tenant, name, version)
            self._refuse_if_held(found)
            await self._registry.remove_version(found)
        await self._unload_everywhere(found.served)
        self._metrics.forget(found)

    async def delete(self, tenant: str, name: str) -> None:
        async with self._changing:
            adapter = self._registry.get(tenant, name)
            for version in adapter.versions.values():
                self._refuse_if_held(version)
            await self._registry.remove(adapter)
        for version in adapter.versions.values():
            await self._unload_everywhere(version.served)
            self._metrics.forget(version)

    # Desired state

    def desired(self) -> set[str]:
        return {v.served for v in self._registry.active()} | self.leases.held()

    async def sync(self, engine: Engine) -> None:
        """Bring one engine to the desired state: load what is missing, unload strays.

        Raises when the engine cannot be reached (it is then not up). An adapter that the
        engine refuses is logged and left out, so one bad file cannot take the engine down;
        its requests get 503 until it loads. Desired state is read again after the loads, so
        an activation that landed meanwhile is not missed.
        """
        async with engine.lock:
            engine.loaded = await self._lora.loaded(engine)
        refused: set[str] = set()
        for _ in range(3):
            missing = [v for s in self.desired() - engine.loaded - refused if (v := self._registry.served(s))]
            if not missing:
                break
            for version in missing:
                for failure in await self._load_on([engine], version, raise_unreachable=True):
                    log.error("sync: %s", failure)
                    refused.add(version.served)
        for served in engine.loaded - self.desired():
            await self._unload(engine, served)

    def describe(self, adapter: Adapter, reports: bool = True) -> dict[str, Any]:
        """The adapter and its versions; `reports=False` leaves the evals' full reports out (the list)."""
        versions = sorted(adapter.versions.values(), key=lambda v: v.created)
        return {"name": adapter.name, "active": adapter.active, "created": adapter.created, "rag": adapter.rag,
                "versions": [self.describe_version(v, reports) for v in versions]}

    def describe_version(self, version: Version, reports: bool = True) -> dict[str, Any]:
        """A version's facts, evals, whether it is active, where it is loaded, how many requests hold it."""
        adapter = self._registry.find(version.tenant, version.name)
        return {
            **version.facts,
            "version": version.version,
            "served_name": version.pinned,  # what the client may pin; the engine-side key names the tenant
            "active": adapter is not None and adapter.active == version.version,
            "created": version.created,
            "evals": [describe_eval(version.evals[suite], reports) for suite in sorted(version.evals)],
            "engines": self._where(version.served),
            "in_flight": self.leases.count(version.served),
        }

    # Internals

    async def _check_collection(self, tenant: str, rag: dict | None, where: str) -> None:
        """Refuse retrieval defaults (`where`: whose) naming a collection the tenant does not have: every
        chat with the adapter would be answered 404."""
        name = (rag or {}).get("collection")
        if name is None:
            return
        assert self._knowledge is not None, "set_knowledge runs before the app serves"
        try:
            await self._knowledge.get_collection(name, tenant=tenant)
        except (CollectionNotFound, InvalidCollectionName):
            known = ", ".join(c["name"] for c in await self._knowledge.list_collections(tenant=tenant)) or "none"
            raise AdapterRejected(
                f"{where} {name!r} is not one of your collections (you have: {known}); "
                "create it first, or name one you have", code="unknown_collection",
            ) from None

    async def _load_on(self, engines: list[Engine], version: Version, raise_unreachable: bool = False) -> list[str]:
        """Load a version on each engine (concurrently); the failures, one message per engine."""

        async def load(engine: Engine) -> str | None:
            async with engine.lock:
                if version.served in engine.loaded:
                    return None
                started = time.perf_counter()
                try:
                    await self._lora.load(engine, version.served, str(version.path.resolve()))
                except EngineCallFailed as exc:
                    if raise_unreachable and exc.status is None:
                        raise
                    return str(exc)
                self._metrics.adapter_load.labels(*version.labels).observe(time.perf_counter() - started)
                return None

        results = await asyncio.gather(*(load(e) for e in engines))
        return [r for r in results if r is not None]

    async def _unload(self, engine: Engine, served: str) -> None:
        async with engine.lock:
            if served in self.desired():  # re-checked under the lock: a request may have pinned it
                return
            try:
                await self._lora.unload(engine, served)
            except EngineCallFailed as exc:
                log.warning("could not unload %s: %s", served, exc)

    async def _unload_everywhere(self, served: str) -> None:
        await asyncio.gather(*(self._unload(e, served) for e in self._engines.engines if served in e.loaded))

    def _retire(self, served: str) -> None:
        """Unload a version that stopped being active, once no request holds it."""

        async def retire() -> None:
            await self.leases.idle(served)
            await self._unload_everywhere(served)

        task = asyncio.create_task(retire(), name=f"retire-{served}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _refuse_if_held(self, version: Version) -> None:
        held = self.leases.count(version.served)
        if held:
            raise AdapterConflict(
                f"{version.pinned} is held by {held} request(s) in flight; retry when they have finished",
                code="version_in_use",
            )

    def _inside_area(self, tenant: str, path: str) -> Path:
        """A folder inside the tenant's own adapters area, never in another tenant's (nor in
        uploads being checked): a path names files, so it must not reach anyone else's."""
        area = self._registry.area(tenant).resolve()
        root = self._registry.root.resolve()
        try:
            candidate = (area / path).resolve()
            folder = candidate != area and candidate.is_dir()
        except (ValueError, OSError) as exc:  # a NUL byte, a name too long, ...
            raise InvalidRequest(f"path {path[:200]!r} is not usable: {exc}", param="path") from None
        first = candidate.relative_to(root).parts[0] if candidate.is_relative_to(root) and candidate != root else ""
        if not candidate.is_relative_to(area) or first == STAGING or (area == root and first.startswith("@")):
            raise InvalidRequest(
                f"path {path!r} is not inside your adapters folder; copy the adapter folder there first",
                param="path",
            )
        if not folder:
            raise InvalidRequest(f"path {path!r} is not a folder inside your adapters folder", param="path")
        return candidate

    async def _canary(self, served: str, folder: Path) -> None:
        """Load the candidate on one engine and check that it changes the base model's output."""
        engine = self._engines.pick()
        log.info("canary of %s on %s", served, engine.name)
        lease = self.leases.acquire(served)
        try:
            async with engine.lock:
                try:
                    await self._lora.load(engine, served, str(folder.resolve()))
                except EngineCallFailed as exc:
                    raise AdapterRejected(f"the engine could not load the adapter: {exc}", code="canary_load_failed")
            try:
                changed = False
                for prompt in _CANARY_PROMPTS:
                    base = await self._lora.complete(engine, self._settings.served_model_name, prompt, _CANARY_TOKENS)
                    tuned = await self._lora.complete(engine, served, prompt, _CANARY_TOKENS)
                    if _differs(base, tuned):
                        changed = True
                        break
            except EngineCallFailed as exc:
                raise AdapterRejected(f"the canary request failed: {exc}", code="canary_failed")
            if not changed:
                raise AdapterRejected(
                    "the adapter does not change the base model's output (its LoRA B matrices are probably "
                    "still zero: was it trained?)",
                    code="canary_no_change",
                )
        finally:
            lease.release()
            # The staged folder goes away after this; the version is loaded again from its final path.
            await self._unload(engine, served)

    def _where(self, served: str) -> dict[str, bool]:
        """Engine name → whether `served` is loaded there."""
        return {e.name: served in e.loaded for e in self._engines.engines}

    def _report(self, target: Version, previous: str | None, started: float, changed: bool) -> dict[str, Any]:
        return {
            "adapter": target.name,
            "active": target.version,
            "served_name": target.pinned,
            "previous": previous,
            "changed": changed,
            "engines": self._where(target.served),
            "rag": self._registry.get(target.tenant, target.name).rag,
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        }


def describe_eval(result: EvalResult, report: bool = True) -> dict[str, Any]:
    shown = {"suite": result.suite, "passed": result.passed, "failures": result.failures, "stored": result.stored}
    return {**shown, "report": result.report} if report else shown


def _differs(base: dict[str, Any], tuned: dict[str, Any]) -> bool:
    a, b = base["choices"][0], tuned["choices"][0]
    if a["text"] != b["text"]:
        return True
    la = (a.get("logprobs") or {}).get("token_logprobs") or []
    lb = (b.get("logprobs") or {}).get("token_logprobs") or []
    return any(abs((x or 0.0) - (y or 0.0)) > _CANARY_TOLERANCE for x, y in zip(la, lb))
