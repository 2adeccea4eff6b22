"""Every operation of the OpenAPI schema, fuzzed by schemathesis (bounded): no input may get a
server error, and every status code answered must be one the schema documents."""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance
from service_helpers import bearer

from bitalloc.service.app import create_app
from bitalloc.service.settings import Settings

EXAMPLES = 25  # per operation and mode, derandomized: the same cases every run


def test_no_input_gets_a_server_error_or_an_undocumented_status(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data", worker_threads=0, reaper_seconds=3600))
    with TestClient(app):  # the lifespan: migrations and the reaper
        headers = bearer(app.state.ctx, "fuzz")
        schema = schemathesis.openapi.from_asgi("/v1/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        failures = {}
        for operation, mode in ((o, m) for o in operations for m in GenerationMode):  # valid input, and invalid

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def fuzz(case):
                case.call_and_validate(headers=headers, checks=[not_a_server_error, status_code_conformance])

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid: the operation takes no input
                continue
            except Exception as exc:  # one line per operation that failed, all of them reported
                failures[f"{operation.label} ({mode.value})"] = str(exc).splitlines()[:6]
    assert len(operations) >= 20
    assert not failures, failures
