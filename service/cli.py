"""The `lorag` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from service.settings import Settings

log = logging.getLogger("lorag")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorag", description="Serve a specialist LLM with vLLM, LoRA and RAG.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (and a local vLLM unless LORAG_ENGINE_URLS is set)")
    serve.add_argument("--host", help="listen address (LORAG_HOST)")
    serve.add_argument("--port", type=int, help="listen port (LORAG_PORT)")

    demo = commands.add_parser("demo", help="build the offline demo world", add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER, help="build-base [--variant tiny] [--seed N] [--force], "
                      "world --out DIR [--seed N], story --url URL --world DIR --out DIR")

    train = commands.add_parser("train", help="train a LoRA adapter from a recipe config", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG.yaml [key=value ...] [--resume]")
    data = commands.add_parser("data", help="check training data (the data doctor)", add_help=False)
    data.add_argument("args", nargs=argparse.REMAINDER, help="check TRAIN.jsonl [--eval EVAL.jsonl] [--model DIR] ...")

    docs = commands.add_parser("docs", help="push documents to / search a running service's knowledge base")
    _remote_options(docs)
    docs_commands = docs.add_subparsers(dest="docs_command", required=True)
    push = docs_commands.add_parser("push", help="upload files, folders (recursively) and JSON-lines files")
    push.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    push.add_argument("--collection", required=True, help="created if it does not exist")
    search = docs_commands.add_parser("search", help="search a collection")
    search.add_argument("query")
    search.add_argument("--collection", required=True)
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--mode", choices=["hybrid", "dense", "keyword"], default="hybrid")
    search.add_argument("--filter", type=json.loads, help='metadata filter as JSON, e.g. \'{"lang": "en"}\'')
    reindex = docs_commands.add_parser(
        "reindex", help="rebuild a collection's chunks and vectors (new chunking, or a new embedder) without downtime",
        description="Searches see the old index until one atomic cut-over; an interrupted reindex leaves the old "
        "index serving, and running the same command again resumes it. Options left out keep the collection's values.")
    reindex.add_argument("collection", metavar="COLLECTION")
    reindex.add_argument("--size", type=int, help="largest chunk, in embedder tokens")
    reindex.add_argument("--overlap", type=int, help="tokens shared by consecutive chunks")
    reindex.add_argument("--strategy", choices=["tokens"], help="how chunks are cut")
    reindex.add_argument("--title-key", help='metadata key embedded before each chunk as context ("": none)')

    adapters = commands.add_parser("adapters", help="push, list, activate, roll back or delete a running service's adapters")
    _remote_options(adapters)
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True)
    push = adapter_commands.add_parser("push", help="upload an adapter folder as a new version (validated, canary-checked)")
    push.add_argument("folder", type=Path, metavar="DIR", help="holds adapter_config.json, adapter_model.safetensors")
    push.add_argument("--name", required=True, help="the adapter's name; clients pass it as `model`")
    push.add_argument("--activate", action="store_true", help="hot-swap to the new version once it is registered")
    push.add_argument("--gate", type=Path, metavar="SUITE.yaml",
                      help="first evaluate the new version pinned with the suite's `gate:`; it is activated (with "
                      "--activate) only if it passes, and the verdict is stored with it (exit 1: failed)")
    _rag_options(push)
    adapter_commands.add_parser("list", help="every version, * marking the active ones, with its stored evals")
    activate = adapter_commands.add_parser("activate", help="hot-swap an adapter to one of its versions")
    activate.add_argument("name")
    activate.add_argument("version")
    _rag_options(activate)
    rollback = adapter_commands.add_parser("rollback", help="activate the previously active version")
    rollback.add_argument("name")
    delete = adapter_commands.add_parser("delete", help="delete a version, or the whole adapter")
    delete.add_argument("name")
    delete.add_argument("version", nargs="?")

    db = commands.add_parser("db", help="the service's database (SQLite under LORAG_HOME, or LORAG_DATABASE_URL)")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply the schema migrations this lorag has and the database lacks "
                           "(each store also applies them when it opens)")

    keys = commands.add_parser("keys", help="create, list or revoke API keys (in the service's store: LORAG_HOME, or "
                               "LORAG_DATABASE_URL)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a key; it is printed once and stored only hashed")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated: chat,knowledge:read,knowledge:write,"
                        "adapters:admin,metrics (metrics: the operator's, reads every tenant's /metrics)")
    create.add_argument("--max-inflight", type=int, metavar="N",
                        help="chat requests the tenant may have in flight when calling with this key, instead of "
                        "LORAG_TENANT_MAX_INFLIGHT (0: no limit)")
    create.add_argument("--tokens-per-minute", type=int, metavar="N",
                        help="tokens the tenant may use per minute when calling with this key, instead of "
                        "LORAG_TENANT_TOKENS_PER_MINUTE (0: no limit)")
    create.add_argument("--expires", type=_expiry, metavar="WHEN",
                        help="refuse the key (401) from then on: a duration (30m, 12h, 30d, 2w) or an ISO date "
                        "or time (2027-01-31, 2027-01-31T18:00; UTC unless an offset is given); default: never")
    key_commands.add_parser("list", help="every key: id, tenant, scopes, created, expires, state, own limits")
    revoke = key_commands.add_parser("revoke", help="stop a key from working, at once")
    revoke.add_argument("id")

    evaluate = commands.add_parser("eval", help="score a running service: retrieval (search) or chat answers, "
                                   "against a suite")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    retrieval = eval_commands.add_parser(
        "retrieval", help="recall@k and MRR of the answer document and text, per search mode",
        description="Each line of SUITE: {\"id\", \"question\", \"doc_id\", \"answer\", \"split\"} (question, and "
        "doc_id or answer or both, required); every question is searched once per mode.")
    retrieval.add_argument("suite", type=Path, metavar="SUITE", help="a JSON-lines question suite")
    _remote_options(retrieval)
    retrieval.add_argument("--collection", required=True)
    retrieval.add_argument("--modes", type=_names, default="dense,keyword,hybrid",
                           help="comma-separated: dense,keyword,hybrid (default: all three)")
    retrieval.add_argument("--k", type=_sizes, default="1,3,5", help="comma-separated cut-offs (default: 1,3,5)")
    retrieval.add_argument("--split", help="score only the questions of this split (e.g. test)")
    retrieval.add_argument("--json", action="store_true", help="print the scores as JSON")
    chat = eval_commands.add_parser(
        "chat", help="format, facts and citations pass rates of chat answers, per cell (model, +prompt, +rag)",
        description="Every case of SUITE is asked in every cell through /v1/chat/completions (temperature 0) and "
        "scored by the suite's checks. Exit 0, 1 if a --gate threshold fails, 2 if nothing could be scored (a bad "
        "suite, gate or argument, or a request the service refused).")
    chat.add_argument("suite", type=Path, metavar="SUITE", help="a YAML suite: name, cases, system_prompt, rag, ...")
    _remote_options(chat)
    chat.add_argument("--cells", type=_names, required=True,
                      help="comma-separated MODEL[+prompt][+rag], e.g. base,base+prompt,base+rag,legal,legal+rag "
                      "(base: the served base model)")
    chat.add_argument("--json", type=Path, metavar="OUT.json", help="write scores, per-tag scores and every answer")
    chat.add_argument("--chart", type=Path, metavar="OUT.png", help="write a bar chart with 95%% interval error bars")
    chat.add_argument("--gate", type=Path, metavar="FILE.yaml",
                      help="fail (exit 1) unless the `gate:` thresholds of FILE hold (FILE may be the suite)")
    chat.add_argument("--concurrency", type=_count, default=4, metavar="N", help="requests in flight (default: 4)")

    args = parser.parse_args(argv)
    if args.command == "docs":
        return _docs(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "adapters":
        return _adapters(args)
    # Flags go through validation too: `--host 0.0.0.0` with auth off must be refused.
    overrides = {k: getattr(args, k, None) for k in ("host", "port") if getattr(args, k, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        parser.exit(2, f"lorag: invalid settings:\n{exc}\n")

    if args.command == "demo":
        return _demo(settings, args.args)
    if args.command == "data":
        return _data(settings, args.args)
    if args.command == "train":
        return _train(settings, args.args)
    if args.command == "keys":
        return _keys(settings, args)
    if args.command == "db":
        return _db(settings)
    return _serve(settings)


def _docs(args: argparse.Namespace) -> int:
    import httpx

    from service.knowledge.client import DocsClient, print_hits, reindex_summary, summary

    client = DocsClient(args.url, args.collection, args.api_key)
    try:
        if args.docs_command == "search":
            print_hits(client.search(args.query, args.top_k, args.mode, args.filter))
            return 0
        if args.docs_command == "reindex":
            chunking = {"size": args.size, "overlap": args.overlap, "strategy": args.strategy, "title_key": args.title_key}
            status = client.reindex({k: v for k, v in chunking.items() if v is not None})
            print(reindex_summary(status))
            return 0 if status["state"] == "done" else 1
        client.ensure_collection()
        outcomes = client.push(args.paths)
    except httpx.TransportError as exc:
        print(f"lorag docs: cannot reach the service at {args.url}: {exc}", file=sys.stderr)
        return 2
    print(summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _eval(args: argparse.Namespace) -> int:
    if args.eval_command == "chat":
        return _eval_chat(args)
    from training.eval.retrieval import MODES, SearchClient, SearchFailed, SuiteError, load_suite, report, score

    if unknown := [m for m in args.modes if m not in MODES]:
        print(f"lorag eval retrieval: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    try:
        questions = load_suite(args.suite)
    except SuiteError as exc:
        print(f"lorag eval retrieval: {exc}", file=sys.stderr)
        return 2
    if args.split is not None:
        questions = [q for q in questions if q.split == args.split]
        if not questions:
            print(f"lorag eval retrieval: no question in {args.suite} has split {args.split!r}", file=sys.stderr)
            return 2
    try:
        results = score(SearchClient(args.url, args.collection, args.api_key), questions, args.modes, args.k)
    except SearchFailed as exc:
        print(f"lorag eval retrieval: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


def _eval_chat(args: argparse.Namespace) -> int:
    from training.eval.chat import ChatFailed, chart, evaluate
    from training.eval.suite import CellError, SuiteError, check_gate, load_gate, load_suite

    for out in (args.json, args.chart):  # before the run: finding out after minutes of generation is too late
        if out is not None and not out.parent.is_dir():
            print(f"lorag eval chat: cannot write {out}: no folder {out.parent}", file=sys.stderr)
            return 2
    try:
        suite = load_suite(args.suite)
        gate = check_gate(load_gate(args.gate), args.cells, suite) if args.gate else None
        report = evaluate(suite, args.url, args.cells, args.api_key, concurrency=args.concurrency)
    except (SuiteError, CellError) as exc:
        print(f"lorag eval chat: {exc}", file=sys.stderr)
        return 2
    except ChatFailed as exc:  # no verdict: a refused request is not a wrong answer
        print(f"lorag eval chat: stopped, {exc}", file=sys.stderr)
        return 2
    print(report.markdown())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.chart:
        chart(report, args.chart)
    if gate is not None and (failures := report.gate(gate)):
        print(f"lorag eval chat: gate {args.gate} failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"cut-offs are 1 or more, got {text!r}")
    return sizes


def _remote_options(parser: argparse.ArgumentParser) -> None:
    """--url and --api-key, for the commands that talk to a running service."""
    parser.add_argument("--url", default=os.environ.get("LORAG_URL", "http://127.0.0.1:8000"),
                        help="the service (LORAG_URL; default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=os.environ.get("LORAG_API_KEY"), help="an API key (LORAG_API_KEY)")


def _db(settings: Settings) -> int:
    from knowledge import KnowledgeSettings, records
    from knowledge.database import Database, DatabaseError, redacted
    from service.adapters import registry
    from service.auth import keys

    # Knowledge first: with SQLite it has a file of its own; with PostgreSQL one database holds all.
    stores = [(KnowledgeSettings(home=settings.home, database_url=settings.database_url).database,
               [("knowledge", records.MIGRATIONS)]),
              (settings.store, [("adapters", registry.MIGRATIONS), ("api_keys", keys.MIGRATIONS)])]
    for url, components in stores:
        try:
            db = Database(url)
            try:
                for component, steps in components:
                    ran = db.migrate(component, steps)
                    print(f"{redacted(url)}: {component} at version {db.version(component)} ({ran} applied now)")
            finally:
                db.close()
        except DatabaseError as exc:  # unreachable, or a schema newer than this lorag
            print(f"lorag: {exc}", file=sys.stderr)
            return 1
    return 0


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from knowledge.database import Database, DatabaseError, redacted
    from service.auth.keys import KeyRefused, KeyStore, utc

    # The service's own store: LORAG_HOME (never the working directory), or LORAG_DATABASE_URL.
    try:
        store = KeyStore(Database(settings.store))
    except DatabaseError as exc:
        print(f"lorag: {exc}", file=sys.stderr)
        return 1
    try:
        if args.keys_command == "create":
            key, token = store.create(args.tenant, [s.strip() for s in args.scopes.split(",") if s.strip()],
                                      max_inflight=args.max_inflight, tokens_per_minute=args.tokens_per_minute,
                                      expires=args.expires)
            until = f", expires {utc(key.expires)}" if key.expires else ""
            where = redacted(settings.database_url) if settings.database_url else settings.store_path
            print(f"key {key.id} for tenant {key.tenant} ({', '.join(key.scopes)}{until}) in {where}; "
                  "shown once, keep it now:")
            print(token)
        elif args.keys_command == "list":
            for key in store.keys():
                state = "revoked" if key.revoked else "expired" if key.expired else "active"
                expires = utc(key.expires) if key.expires else "never"
                own = (("max_inflight", key.max_inflight), ("tokens_per_minute", key.tokens_per_minute))
                limits = " ".join(f"{name}={value}" for name, value in own if value is not None)
                print(f"{key.id}  {key.tenant:20} {','.join(key.scopes):50} {utc(key.created)}  "
                      f"expires {expires:20}  {state}  {limits}".rstrip())
        else:
            store.revoke(args.id)
            print(f"revoked {args.id}")
    except KeyRefused as exc:
        print(f"lorag keys: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


_DURATION = re.compile(r"(\d+)([mhdw])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _expiry(text: str) -> float:
    """`--expires` as a unix time: a duration from now (30m, 12h, 30d, 2w) or an ISO date or time."""
    now = time.time()
    if match := _DURATION.fullmatch(text.strip()):
        at = now + int(match[1]) * _UNIT_S[match[2]]
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a duration (30m, 12h, 30d, 2w) nor an ISO date or time (2027-01-31)"
            ) from None
        at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if at <= now:
        raise argparse.ArgumentTypeError(f"{text!r} is not in the future")
    return at


def _rag_options(parser: argparse.ArgumentParser) -> None:
    """--rag-collection, --rag-top-k, --rag-mode: the adapter's retrieval defaults, set at activation."""
    parser.add_argument("--rag-collection", metavar="C", help="also set the adapter's retrieval default: chat with it "
                        "and no `rag` searches collection C (the request's `rag` still wins)")
    parser.add_argument("--rag-top-k", type=int, metavar="N", help="with --rag-collection: chunks to retrieve (1-100)")
    parser.add_argument("--rag-mode", choices=["hybrid", "dense", "keyword"], help="with --rag-collection: search mode")


def _rag_default(args: argparse.Namespace) -> dict | None:
    """The retrieval defaults the --rag-* options ask for; None when they ask for none."""
    if args.rag_collection is None:
        if args.rag_top_k is not None or args.rag_mode is not None:
            raise ValueError("--rag-top-k and --rag-mode need --rag-collection")
        return None
    if args.adapters_command == "push" and not args.activate:
        raise ValueError("--rag-collection is set at activation: add --activate")
    rag = {"collection": args.rag_collection, "top_k": args.rag_top_k, "mode": args.rag_mode}
    return {k: v for k, v in rag.items() if v is not None}


def _adapters(args: argparse.Namespace) -> int:
    import httpx

    from service.adapters.client import AdapterCommandFailed, AdaptersClient, describe

    try:
        rag = _rag_default(args) if args.adapters_command in ("push", "activate") else None
    except ValueError as exc:
        print(f"lorag adapters: {exc}", file=sys.stderr)
        return 2
    client = AdaptersClient(args.url, args.api_key)
    gate = getattr(args, "gate", None)
    try:
        if gate is not None:
            from training.eval.gate import check_suite, run_gate
            from training.eval.suite import SuiteError

            try:
                check_suite(gate, args.name)  # before the upload: a bad suite leaves nothing behind
            except SuiteError as exc:
                print(f"lorag adapters: --gate {gate}: {exc}", file=sys.stderr)
                return 2
            version = client.push(args.folder, args.name, activate=False)["version"]
            print(f"{version['served_name']} uploaded, inactive until it passes the gate")
            return run_gate(args.url, args.name, version["version"], gate, api_key=args.api_key,
                            activate=args.activate, rag=rag, prog="lorag adapters")
        if args.adapters_command == "push":
            result = client.push(args.folder, args.name, args.activate, rag)
            version = result["version"]
            print(f"{version['served_name']} {result['status']}")
            if result.get("activation"):
                print(_activation(result["activation"]))
        elif args.adapters_command == "list":
            print(describe(client.list()))
        elif args.adapters_command == "activate":
            print(_activation(client.activate(args.name, args.version, rag)))
        elif args.adapters_command == "rollback":
            print(_activation(client.rollback(args.name)))
        else:
            client.delete(args.name, args.version)
            print(f"deleted {args.name}{'@' + args.version if args.version else ''}")
    except AdapterCommandFailed as exc:
        print(f"lorag adapters: {exc}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:
        print(f"lorag adapters: cannot reach the service at {args.url}: {exc}", file=sys.stderr)
        return 2
    return 0


def _activation(report: dict) -> str:
    was = f"{report['adapter']}@{report['previous']}" if report["previous"] else "nothing"
    verb = "active (was " + was + ")" if report["changed"] else "already active"
    rag = report.get("rag")
    retrieval = f", retrieval default {rag['collection']}" if rag else ""
    return f"{report['served_name']} {verb} in {report['elapsed_ms']:.0f} ms{retrieval}"


def _demo(settings: Settings, args: list[str]) -> int:
    """Run the training package's demo builder in its own process (service never imports training)."""
    defaults: dict[str, object] = {}
    if args[:1] == ["build-base"]:
        defaults["--out"] = settings.model_path
    if args[:1] == ["run"]:  # where this service keeps its data and model, and where it will listen
        defaults |= {"--home": settings.home, "--model": settings.model_path,
                     "--url": f"http://{settings.host}:{settings.port}"}
    args = _with_defaults(args, defaults)
    return subprocess.call([sys.executable, "-m", "training.demo", *args])


def _data(settings: Settings, args: list[str]) -> int:
    """The training package's data doctor in its own process; the model defaults to the served one."""
    defaults: dict[str, object] = {}
    if args[:1] in (["check"], ["raft"]):
        defaults["--model"] = settings.model_path
    if args[:1] == ["raft"]:  # place sources exactly as this service's chat does
        defaults |= {"--top-k": settings.rag_top_k, "--mode": settings.rag_mode, "--max-tokens": settings.max_tokens,
                     "--context-tokens": settings.engine_max_model_len, "--system-template": settings.rag_system_template}
    return subprocess.call([sys.executable, "-m", "training.data", *_with_defaults(args, defaults)])


def _with_defaults(args: list[str], defaults: dict[str, object]) -> list[str]:
    """`args` plus each default flag it does not give (as `--flag value` or `--flag=value`)."""
    def given(flag: str) -> bool:
        return any(arg == flag or arg.startswith(flag + "=") for arg in args)

    return [*args, *(item for flag, value in defaults.items() if not given(flag) for item in (flag, str(value)))]


def _train(settings: Settings, args: list[str]) -> int:
    """The recipe in its own process; a config without `model` trains on the served model."""
    return subprocess.call([sys.executable, "-m", "training.recipe", *args, "--default-model", str(settings.model_path)])


def _serve(settings: Settings) -> int:
    from service.app import create_app
    from service.drain import serve

    from service.request_id import JsonFormatter, RequestIdFilter

    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if settings.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    )
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    # One line per engine call would drown the gateway's own log.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    if settings.embedded:
        if settings.model is None and not (settings.model_path / "config.json").exists():
            log.info("no model configured and no demo model yet: building it at %s", settings.model_path)
            if _demo(settings, ["build-base"]) != 0:
                return 1
        if not (settings.model_path / "config.json").exists():
            log.error("LORAG_MODEL=%s is not a model directory (no config.json)", settings.model_path)
            return 2
    # On SIGTERM: drain (503 to new requests, those in flight finish), then stop; the engine stops last.
    app = create_app(settings)
    serve(app, settings.host, settings.port, app.state.drain, settings.drain_timeout_s,
          keepalive_timeout_s=settings.keepalive_timeout_s, header_timeout_s=settings.header_timeout_s,
          max_connections=settings.max_connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
