"""``labelling dashboard EXP``: optuna-dashboard on a sweep's study, on 127.0.0.1, the password never printed."""

from __future__ import annotations

from pathlib import Path

from labelling.runs.sweep import STORAGE_ENV, storage_url


def dashboard_storage(experiment: str, storage: str | None, run_root: str = "runs") -> str:
    """The sweep's study storage of `experiment`: `storage`, ``$LABELLING_STORAGE`` or its SQLite file.

    Raises:
        ConfigError: no storage given and no ``runs/<exp>/study.db`` (the sweep has not run yet).
    """
    import os

    from labelling.errors import ConfigError

    url = storage or os.environ.get(STORAGE_ENV) or None
    if url is None:
        path = Path(run_root) / experiment / "study.db"
        if not path.is_file():
            found = sorted(p.parent.name for p in Path(run_root).glob("*/study.db"))
            raise ConfigError(f"no study database at {path}: run `make sweep EXP={experiment}` first, or give "
                              f"--storage URL. Studies under {run_root}/: {', '.join(found) or 'none'}")
        url = f"sqlite:///{path}"
    return storage_url(url)


def serve_dashboard(experiment: str, storage: str | None = None, port: int = 8080, run_root: str = "runs") -> int:
    """Serve optuna-dashboard on the sweep study of `experiment` at http://127.0.0.1:PORT until Ctrl-C."""
    import socket

    from labelling.errors import ConfigError, redact

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise ConfigError(f"port {port} on 127.0.0.1 is taken ({err.strerror}); pass --port N "
                              "(make dashboard PORT=N)") from None
    url = dashboard_storage(experiment, storage, run_root)
    try:
        import optuna
        from optuna_dashboard import run_server
    except ImportError as err:
        raise ConfigError(f"the dashboard needs optuna-dashboard: pip install 'labelling[hpo]' ({err})") from None
    try:
        studies = [s.study_name for s in optuna.get_all_study_summaries(url)]
    except Exception as err:  # a wrong URL, an unreachable server: say so without the password
        raise ConfigError(f"cannot open the study storage {redact(url)}: {type(err).__name__}: {redact(err)}") from None
    print(f"optuna-dashboard on http://127.0.0.1:{port}/ - {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} "
          f"({', '.join(studies) or 'none yet'}) in {redact(url)}; Ctrl-C stops it", flush=True)
    run_server(url, host="127.0.0.1", port=port)
    return 0
