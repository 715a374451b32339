"""The FastAPI application: `create_app(settings)` wires routers, errors and the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
from anyio import to_thread
from fastapi import FastAPI

from knowledge import KnowledgeBase, KnowledgeSettings
from knowledge.database import Database
from service.adapters.inspection import BaseModelInfo
from service.adapters.registry import Registry
from service.adapters.router import router as adapters_router
from service.adapters.service import AdapterService
from service.auth.guard import Guard, knowledge_scope, require
from service.auth.keys import KeyStore
from service.body_limit import BodyLimit
from service.drain import Drain, DrainGate
from service.request_id import RequestId
from service.chat.query_embedding import load_query_encoder
from service.chat.retrieval import Retrieval, load_builder
from service.chat.fair_share import FairShare
from service.chat.router import router as chat_router
from service.chat.service import ChatService
from service.engine.chat import EngineChat
from service.engine.launcher import engine_key, launch_spec
from service.engine.lora import LoraEndpoints
from service.engine.pool import EnginePool
from service.engine.supervisor import EngineSupervisor
from service.errors import install_error_handlers
from service.health.router import router as health_router
from service.knowledge.router import router as knowledge_router
from service.knowledge.service import KnowledgeService
from service.metrics import Metrics
from service.models.catalog import ModelCatalog
from service.models.router import router as models_router
from service.settings import Settings

log = logging.getLogger("lorag")


def create_app(settings: Settings, knowledge_settings: KnowledgeSettings | None = None) -> FastAPI:
    """The gateway; knowledge settings default to LORAG_* variables with the service's home."""
    knowledge_settings = knowledge_settings or KnowledgeSettings(home=settings.home, database_url=settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Every resource is closed by the stack, last opened first: at shutdown, and just the same when
        # a start step fails, so a failed start leaves no engine process and no open client behind.
        async with AsyncExitStack() as stack:
            # The engines answer only requests carrying this key (their adapter routes load from any path).
            key = engine_key(settings)
            if key is None:
                log.warning("LORAG_ENGINE_API_KEY is not set: the engines must answer anyone who reaches them")
            engine_auth = {"Authorization": f"Bearer {key}"} if key else None  # sent by both engine clients
            # One pooled client for the engine's admin traffic (chat has its own: service.engine.chat);
            # per-request timeouts are set where requests are built.
            http = await stack.enter_async_context(
                httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
                                  headers=engine_auth)
            )
            metrics = Metrics()
            registry = Registry(Database(settings.store), settings.adapters_path)
            stack.callback(registry.close)
            keys = KeyStore(Database(settings.store))
            stack.callback(keys.close)
            app.state.guard = Guard(keys, settings.auth_required, settings.metrics_key_required)
            if not settings.auth_required:
                log.warning("API keys are not required (LORAG_AUTH=%s, listening on %s)", settings.auth, settings.host)
            if settings.auth_required and not settings.metrics_key_required:
                log.warning("/metrics needs no key (LORAG_METRICS_AUTH=open): it shows every tenant's adapters and traffic")
            if settings.embedded:
                supervisor = EngineSupervisor(
                    lambda: launch_spec(settings, key),
                    http,
                    startup_timeout_s=settings.engine_startup_timeout_s,
                    backoff_max_s=settings.engine_restart_backoff_max_s,
                    # Sync the new engine's adapters at once, not at the next probe.
                    on_ready=lambda: engines.probe(),
                )
                engines = EnginePool.embedded(http, supervisor)
            else:
                engines = EnginePool.external(http, settings.engine_urls)
            base = await to_thread.run_sync(_base_info, settings)
            adapters = AdapterService(settings, registry, engines, LoraEndpoints(http), base, metrics)
            engines.set_sync(adapters.sync)
            metrics.watch_engines(lambda: engines.engines)
            catalog = ModelCatalog(settings.served_model_name, registry)
            # Measured on 2 cores beside vLLM: a query embeds in 12 ms with one torch thread and
            # in 146 ms with two, whose OpenMP threads fight the engine's for the same cores.
            import torch  # heavy: imported when the app starts, not when it is built

            torch.set_num_threads(settings.torch_threads)
            # The engine starts in the background first, so its start overlaps the
            # knowledge base's (the embedder and Chroma take seconds to open).
            stack.push_async_callback(engines.stop)
            await engines.start()
            stack.push_async_callback(adapters.close)
            kb = await to_thread.run_sync(KnowledgeBase, knowledge_settings)
            stack.callback(kb.close)
            # LORAG_QUERY_ENCODER=onnx: exported at first start (seconds), checked against torch at every start.
            query_encoder = await to_thread.run_sync(load_query_encoder, settings, kb.embedder)
            builder = await to_thread.run_sync(load_builder, settings)
            retrieval = Retrieval(kb, builder, settings, query_encoder)
            stack.push_async_callback(retrieval.close)
            app.state.knowledge = KnowledgeService(kb, settings)
            stack.callback(app.state.knowledge.close)  # before kb.close: stops the reindexes first
            adapters.set_knowledge(app.state.knowledge)  # before any request: uploads check their rag.collection
            app.state.engines = engines
            app.state.catalog = catalog
            app.state.adapters = adapters
            app.state.metrics = metrics
            engine_chat = EngineChat(
                settings.engine_timeout_s, on_unreachable=engines.mark_down, headers=engine_auth,
                on_connection=metrics.engine_connections.inc,
            )
            stack.push_async_callback(engine_chat.close)
            app.state.fair_share = FairShare(settings, metrics)
            app.state.chat = ChatService(
                settings, engines, catalog, adapters, engine_chat, retrieval, metrics, app.state.fair_share
            )
            log.info("lorag serving model %r (%s engine)", catalog.base, "embedded" if settings.embedded else "external")
            yield

    app = FastAPI(
        title="lorag",
        summary="A specialist LLM: LoRA adapters for behaviour, a live knowledge base for facts, vLLM for throughput.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        upload_max_bytes=settings.max_upload_bytes,
        upload_paths=r"POST /v1/collections/[^/]+/(files|documents/bulk)|POST /v1/adapters/[^/]+/versions",
    )
    app.state.drain = Drain()  # started by the server on SIGTERM (service.drain)
    app.add_middleware(DrainGate, drain=app.state.drain)
    app.add_middleware(RequestId)  # outermost: every response carries the id, even a refused body
    install_error_handlers(app)
    app.include_router(chat_router, dependencies=[require("chat")])
    app.include_router(models_router, dependencies=[require("chat")])
    app.include_router(knowledge_router, dependencies=[require(knowledge_scope)])
    app.include_router(adapters_router, dependencies=[require("adapters:admin")])
    app.include_router(health_router)
    return app


def _base_info(settings: Settings) -> BaseModelInfo | None:
    """What adapters are checked against; None (logged) when the base's weights are not readable here."""
    try:
        return BaseModelInfo.load(settings.model_path)
    except Exception as exc:  # any unreadable base: adapters are refused with the reason, serving goes on
        log.warning("cannot read the base model at %s (%s): adapter uploads are refused", settings.model_path, exc)
        return None
