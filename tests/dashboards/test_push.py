"""Publishing dashboards to Grafana, against `FakeGrafana` (a real HTTP server checking Grafana's rules)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from detector.dashboards import FOLDER_TITLE, build_dashboards
from detector.dashboards.push import (
    DEFAULT_FOLDER_UID,
    POSTGRES_UID,
    PROMETHEUS_UID,
    DataSource,
    PushReport,
    bind_datasources,
    postgres_datasource,
    prometheus_datasource,
    push,
)
from detector.grafana import GrafanaClient, GrafanaError
from detector.http import GrafanaAddress
from tests.grafana_server import FakeGrafana
from tests.receivers import RecordingReceiver
from tests.test_cli import cli_env, mia

TOKEN = "glsa_admin_0123456789abcdef"
EDITOR_TOKEN = "glsa_editor_0123456789abcdef"
FOLDER = "MIA Detector"
PASSWORD = "s3cr3t-reader"


def tiny_dashboard(uid: str, title: str) -> dict[str, Any]:
    """A dashboard shaped as the generator's: data-source variables and panels that use them."""
    return {
        "uid": uid,
        "title": title,
        "schemaVersion": 39,
        "templating": {
            "list": [
                {"type": "datasource", "name": "prometheus", "query": "prometheus", "current": {}},
                {
                    "type": "datasource",
                    "name": "postgres",
                    "query": "grafana-postgresql-datasource",
                    "current": {},
                },
                {"type": "query", "name": "model", "query": "label_values(model)"},
            ]
        },
        "panels": [
            {
                "id": 1,
                "type": "timeseries",
                "title": "Queries",
                "datasource": {"type": "prometheus", "uid": "${prometheus}"},
                "targets": [{"refId": "A", "expr": "rate(mia_detector_queries_total[5m])"}],
            },
            {
                "id": 2,
                "type": "table",
                "title": "Alerts",
                "datasource": {"type": "grafana-postgresql-datasource", "uid": "${postgres}"},
                "targets": [{"refId": "A", "rawSql": "SELECT * FROM alerts"}],
            },
        ],
    }


# Two small dashboards for the cases that change them; the real ones for the rest.
DASHBOARDS = {
    "mia-overview": tiny_dashboard("mia-overview", "MIA overview"),
    "mia-client": tiny_dashboard("mia-client", "MIA client investigation"),
}
REAL = build_dashboards()


def datasources(password: str | None = None) -> list[DataSource]:
    return [
        prometheus_datasource("http://prometheus:9090"),
        postgres_datasource("db:5432", "mia", "grafana_reader", password=password, sslmode="disable"),
    ]


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    with FakeGrafana(tokens={TOKEN: "Admin", EDITOR_TOKEN: "Editor"}) as running:
        yield running


@pytest.fixture
def client(grafana: FakeGrafana) -> Iterator[GrafanaClient]:
    made = GrafanaClient(grafana.url, TOKEN, timeout=2.0)
    yield made
    made.close()


def actions(report: PushReport) -> dict[tuple[str, str], str]:
    return {(change.kind, change.uid): change.action for change in report.changes}


def test_push_creates_the_folder_the_data_sources_and_every_dashboard(
    grafana: FakeGrafana, client: GrafanaClient
) -> None:
    report = push(client, REAL, datasources(PASSWORD), FOLDER_TITLE)

    assert actions(report) == {
        ("folder", DEFAULT_FOLDER_UID): "created",
        ("datasource", PROMETHEUS_UID): "created",
        ("datasource", POSTGRES_UID): "created",
        **{("dashboard", uid): "created" for uid in REAL},
    }
    assert report.summary == f"{len(REAL) + 3} created, 0 updated, 0 unchanged"
    assert grafana.folders[DEFAULT_FOLDER_UID]["title"] == FOLDER_TITLE
    prometheus, postgres = grafana.datasources[PROMETHEUS_UID], grafana.datasources[POSTGRES_UID]
    assert (prometheus["type"], prometheus["url"], prometheus["access"]) == (
        "prometheus",
        "http://prometheus:9090",
        "proxy",
    )
    assert (postgres["type"], postgres["url"], postgres["user"]) == ("postgres", "db:5432", "grafana_reader")
    assert postgres["jsonData"] == {"database": "mia", "sslmode": "disable"}
    # The password went in as a secret: stored apart, flagged, never answered back.
    assert grafana.secrets[POSTGRES_UID] == {"password": PASSWORD}
    assert postgres["secureJsonFields"] == {"password": True}
    assert PASSWORD not in str(client.datasource(POSTGRES_UID))
    uids = {"prometheus": PROMETHEUS_UID, "postgres": POSTGRES_UID}
    for uid, built in REAL.items():
        stored = grafana.dashboards[uid]
        assert stored["folderUid"] == DEFAULT_FOLDER_UID
        assert stored["dashboard"]["version"] == 1
        resolved = 0
        for variable, original in zip(
            stored["dashboard"]["templating"]["list"], built["templating"]["list"], strict=True
        ):
            if variable["type"] == "datasource":
                # Each data-source variable resolves to the data source just made, by uid.
                assert variable["current"]["value"] == uids[variable["name"]]
                resolved += 1
            else:
                assert variable == original
        assert resolved >= 1
        # Apart from that, Grafana holds the dashboard as built.
        for key in set(built) - {"templating", "id", "version"}:
            assert stored["dashboard"][key] == built[key], key
    [overview] = [change for change in report.dashboards if change.uid == "mia-overview"]
    assert overview.url is not None and overview.url.startswith("/d/mia-overview/") and overview.version == 1


def test_a_second_push_changes_nothing(grafana: FakeGrafana, client: GrafanaClient) -> None:
    first = push(client, REAL, datasources(), FOLDER_TITLE)
    writes = len(grafana.writes())
    state = copy.deepcopy((grafana.folders, grafana.datasources, grafana.dashboards))

    second = push(client, build_dashboards(), datasources(), FOLDER_TITLE)

    assert {action for action in actions(second).values()} == {"unchanged"}
    assert second.summary == f"0 created, 0 updated, {len(REAL) + 3} unchanged"
    assert [c.uid for c in second.changes] == [c.uid for c in first.changes]
    assert [c.version for c in second.changes] == [c.version for c in first.changes]
    assert len(grafana.writes()) == writes  # only reads the second time
    assert (grafana.folders, grafana.datasources, grafana.dashboards) == state
    assert (
        len(grafana.folders) == 1 and len(grafana.datasources) == 2 and len(grafana.dashboards) == len(REAL)
    )


def test_a_password_cannot_be_compared_so_it_is_written_again(
    grafana: FakeGrafana, client: GrafanaClient
) -> None:
    push(client, DASHBOARDS, datasources(PASSWORD), FOLDER)
    second = push(client, DASHBOARDS, datasources(PASSWORD), FOLDER)

    assert actions(second)[("datasource", POSTGRES_UID)] == "updated"
    assert grafana.datasources[POSTGRES_UID]["version"] == 2
    assert {a for (kind, _), a in actions(second).items() if kind != "datasource"} == {"unchanged"}
    # Pushing without the password keeps the stored one.
    third = push(client, DASHBOARDS, datasources(), FOLDER)
    assert actions(third)[("datasource", POSTGRES_UID)] == "unchanged"
    assert grafana.secrets[POSTGRES_UID] == {"password": PASSWORD}


def test_what_changed_is_updated_and_its_version_bumps(grafana: FakeGrafana, client: GrafanaClient) -> None:
    push(client, DASHBOARDS, datasources(), FOLDER)
    changed = copy.deepcopy(DASHBOARDS)
    changed["mia-client"]["panels"][0]["title"] = "Queries per second"
    moved = [
        prometheus_datasource("http://prometheus.monitoring:9090"),
        datasources()[1],
    ]

    report = push(client, changed, moved, FOLDER)

    assert actions(report) == {
        ("folder", DEFAULT_FOLDER_UID): "unchanged",
        ("datasource", PROMETHEUS_UID): "updated",
        ("datasource", POSTGRES_UID): "unchanged",
        ("dashboard", "mia-overview"): "unchanged",
        ("dashboard", "mia-client"): "updated",
    }
    assert grafana.dashboards["mia-client"]["dashboard"]["version"] == 2
    assert grafana.dashboards["mia-overview"]["dashboard"]["version"] == 1
    assert grafana.datasources[PROMETHEUS_UID]["url"] == "http://prometheus.monitoring:9090"


def test_what_operators_made_by_hand_is_adopted(grafana: FakeGrafana, client: GrafanaClient) -> None:
    client.create_folder(FOLDER, "handmade-folder")
    client.create_datasource(
        {
            "name": "mia-detector Prometheus",
            "uid": "handmade-prom",
            "type": "prometheus",
            "url": "http://old:9090",
            "access": "proxy",
            "isDefault": True,
            "jsonData": {"timeInterval": "15s"},
        }
    )

    report = push(client, DASHBOARDS, datasources(), FOLDER)

    assert actions(report)[("folder", "handmade-folder")] == "unchanged"
    assert actions(report)[("datasource", "handmade-prom")] == "updated"
    assert set(grafana.folders) == {"handmade-folder"}
    adopted = grafana.datasources["handmade-prom"]
    # Our settings win; what we do not manage (default data source, other jsonData) stays.
    assert adopted["url"] == "http://prometheus:9090" and adopted["isDefault"] is True
    assert adopted["jsonData"] == {"timeInterval": "15s", "httpMethod": "POST"}
    stored = grafana.dashboards["mia-overview"]
    assert stored["folderUid"] == "handmade-folder"
    [variable] = [v for v in stored["dashboard"]["templating"]["list"] if v["name"] == "prometheus"]
    assert variable["current"]["value"] == "handmade-prom"
    assert actions(push(client, DASHBOARDS, datasources(), FOLDER)) == {
        key: "unchanged" for key in actions(report)
    }


def test_provisioned_and_kept_data_sources_are_used_as_they_are(
    grafana: FakeGrafana, client: GrafanaClient
) -> None:
    push(client, DASHBOARDS, datasources(), FOLDER)
    grafana.datasources[PROMETHEUS_UID]["readOnly"] = True  # as if from a provisioning file
    keep_postgres = dataclasses.replace(datasources()[1], url="elsewhere:5432", update_existing=False)

    report = push(client, DASHBOARDS, [prometheus_datasource("http://other:9090"), keep_postgres], FOLDER)

    notes = {change.uid: (change.action, change.note) for change in report.datasources}
    assert notes == {PROMETHEUS_UID: ("unchanged", "provisioned"), POSTGRES_UID: ("unchanged", "kept")}
    assert grafana.datasources[PROMETHEUS_UID]["url"] == "http://prometheus:9090"
    assert grafana.datasources[POSTGRES_UID]["url"] == "db:5432"


def test_a_moved_dashboard_goes_back_to_the_folder(grafana: FakeGrafana, client: GrafanaClient) -> None:
    push(client, DASHBOARDS, datasources(), FOLDER)
    grafana.dashboards["mia-client"]["folderUid"] = ""  # moved to General by hand

    report = push(client, DASHBOARDS, datasources(), FOLDER)

    assert actions(report)[("dashboard", "mia-client")] == "updated"
    assert grafana.dashboards["mia-client"]["folderUid"] == DEFAULT_FOLDER_UID


def test_a_renamed_folder_gets_its_title_back(grafana: FakeGrafana, client: GrafanaClient) -> None:
    push(client, DASHBOARDS, datasources(), FOLDER)
    client.rename_folder(DEFAULT_FOLDER_UID, "Renamed")

    report = push(client, DASHBOARDS, datasources(), FOLDER)

    assert report.folder.action == "updated"
    assert grafana.folders[DEFAULT_FOLDER_UID]["title"] == FOLDER


def test_bad_dashboards_are_refused_before_any_request(grafana: FakeGrafana, client: GrafanaClient) -> None:
    with pytest.raises(ValueError, match="must have the uid"):
        push(client, {"a": {"uid": "b", "title": "B"}}, datasources(), FOLDER)
    with pytest.raises(ValueError, match="must have the uid"):
        push(client, {"a": {"uid": "a"}}, datasources(), FOLDER)
    assert grafana.requests == []


def test_a_variable_of_another_plugin_is_refused(grafana: FakeGrafana, client: GrafanaClient) -> None:
    dashboard = tiny_dashboard("x", "X")
    dashboard["templating"]["list"][0]["query"] = "loki"
    with pytest.raises(ValueError, match="lists loki data sources"):
        push(client, {"x": dashboard}, datasources(), FOLDER)
    assert grafana.requests == []
    # `postgres` is an alias of grafana-postgresql-datasource: no complaint for the PostgreSQL variable.
    bound = bind_datasources(tiny_dashboard("x", "X"), datasources())
    assert bound["templating"]["list"][1]["current"]["value"] == POSTGRES_UID
    assert tiny_dashboard("x", "X")["templating"]["list"][1]["current"] == {}  # a copy was changed


def test_an_editor_token_may_not_manage_data_sources(grafana: FakeGrafana) -> None:
    editor = GrafanaClient(grafana.url, EDITOR_TOKEN, timeout=2.0)
    with pytest.raises(GrafanaError) as raised:
        push(editor, DASHBOARDS, datasources(), FOLDER)
    editor.close()
    error = raised.value
    assert error.status == 403 and not error.transient
    assert str(error).startswith("Grafana: get data source mia-prometheus: HTTP 403 ")
    assert "\n" not in str(error) and EDITOR_TOKEN not in str(error)


def test_a_wrong_token_is_a_one_line_error_without_the_token(grafana: FakeGrafana) -> None:
    wrong = GrafanaClient(grafana.url, "glsa_wrong_token_123456", timeout=2.0)
    with pytest.raises(GrafanaError) as raised:
        push(wrong, DASHBOARDS, datasources(), FOLDER)
    wrong.close()
    assert raised.value.status == 401 and not raised.value.transient
    assert str(raised.value) == (
        "Grafana: get folder mia-detector: HTTP 401 Invalid API key (the token was refused)"
    )
    assert grafana.folders == {} and grafana.dashboards == {}


def test_a_grafana_that_is_down_is_a_transient_error(grafana: FakeGrafana, client: GrafanaClient) -> None:
    grafana.stop()
    with pytest.raises(GrafanaError) as raised:
        push(client, DASHBOARDS, datasources(), FOLDER)
    assert raised.value.transient and raised.value.status is None
    message = str(raised.value)
    assert message.startswith("Grafana: get folder mia-detector: no answer (ConnectionError")
    assert "127.0.0.1" not in message and str(grafana.url) not in message and "\n" not in message


def test_answers_that_are_not_grafana_s_keep_their_status() -> None:
    # A proxy in front of Grafana answers in HTML or plain text, not in Grafana's JSON.
    with RecordingReceiver(status=502, body="<html>502 Bad Gateway: no message</html>") as proxy:
        client = GrafanaClient(proxy.url, TOKEN, timeout=2.0)
        with pytest.raises(GrafanaError) as raised:
            client.folders()
        assert str(raised.value) == "Grafana: list folders: HTTP 502 <html>502 Bad Gateway: no message</html>"
        assert raised.value.transient
        proxy.respond(200, "<html>a login page</html>")
        with pytest.raises(GrafanaError, match="the answer is not JSON"):
            client.folders()
        proxy.respond(404, "404 page not found")
        assert client.folder("mia-detector") is None
        assert {request.headers["authorization"] for request in proxy.requests} == {f"Bearer {TOKEN}"}
        client.close()


def test_grafana_served_from_a_sub_path() -> None:
    with FakeGrafana(tokens={TOKEN: "Admin"}, prefix="/grafana") as grafana:
        client = GrafanaClient(grafana.url + "/", TOKEN, timeout=2.0)
        assert client.address.url_path_prefix == "grafana/"
        report = push(client, DASHBOARDS, datasources(), FOLDER)
        client.close()
    assert report.summary == "5 created, 0 updated, 0 unchanged"
    [overview] = [change for change in report.dashboards if change.uid == "mia-overview"]
    assert overview.url == "/grafana/d/mia-overview/mia-overview"
    assert client.address.link(overview.url) == f"{grafana.url}/d/mia-overview/mia-overview"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:3000", GrafanaAddress("http", "127.0.0.1", 3000, "")),
        ("https://ops.example/grafana/", GrafanaAddress("https", "ops.example", None, "grafana/")),
        ("http://[::1]:3000/a/b", GrafanaAddress("http", "[::1]", 3000, "a/b/")),
    ],
)
def test_urls_are_split_as_grafana_api_wants(url: str, address: GrafanaAddress) -> None:
    assert GrafanaAddress.parse(url) == address
    assert address.base_url == url.rstrip("/")
    assert address.link("/d/x/y") == f"{address.base_url}/d/x/y"


def test_links_under_a_sub_path_are_not_doubled() -> None:
    address = GrafanaAddress.parse("https://ops.example/grafana")
    assert address.link("/grafana/d/x/y") == "https://ops.example/grafana/d/x/y"
    assert address.link("/d/x/y") == "https://ops.example/grafana/d/x/y"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://grafana",
        "grafana:3000",
        "http://admin:pw@grafana:3000",
        "http://grafana/?orgId=2",
        "http://g:x",
    ],
)
def test_bad_urls_are_refused_in_one_line(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        GrafanaAddress.parse(url)
    assert "\n" not in str(raised.value) and "pw" not in str(raised.value)


# -- the command line ---------------------------------------------------------------------------------------


def test_the_cli_pushes_and_a_second_run_changes_nothing(grafana: FakeGrafana) -> None:
    env = cli_env(MIA_GRAFANA_TOKEN=TOKEN, MIA_GRAFANA_POSTGRES_PASSWORD=PASSWORD)
    args = ("dashboards", "push", "--url", grafana.url, "--prometheus-url", "http://prometheus:9090")

    first = mia(*args, "--postgres-host", "db:5432", env=env)

    assert first.returncode == 0, first.stderr
    from detector.dashboards import build_dashboards

    built = build_dashboards()
    assert set(grafana.dashboards) == set(built)
    assert f"created   folder     {DEFAULT_FOLDER_UID}" in first.stdout
    assert f"{grafana.url}/d/" in first.stdout
    assert grafana.secrets[POSTGRES_UID] == {"password": PASSWORD}
    assert TOKEN not in first.stdout + first.stderr and PASSWORD not in first.stdout + first.stderr
    versions = {uid: stored["dashboard"]["version"] for uid, stored in grafana.dashboards.items()}

    # Without data-source options, the data sources are left as they are (and so is the password).
    second = mia("dashboards", "push", env=cli_env(MIA_GRAFANA_TOKEN=TOKEN, MIA_GRAFANA_URL=grafana.url))

    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout and "updated" not in second.stdout
    assert f"0 created, 0 updated, {len(built) + 3} unchanged" in second.stderr
    assert {uid: stored["dashboard"]["version"] for uid, stored in grafana.dashboards.items()} == versions


def test_the_cli_reports_a_wrong_token_in_one_line_without_it(grafana: FakeGrafana) -> None:
    wrong = "glsa_not_the_right_one_42"
    result = mia("dashboards", "push", "--url", grafana.url, env=cli_env(MIA_GRAFANA_TOKEN=wrong))

    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line == (
        "mia-detector: error: Grafana: get folder mia-detector: HTTP 401 Invalid API key"
        " (the token was refused)"
    )
    assert wrong not in result.stdout + result.stderr
    assert grafana.folders == {}


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {"MIA_GRAFANA_TOKEN": TOKEN}, "say where Grafana is: --url or MIA_GRAFANA_URL"),
        (("--url", "http://127.0.0.1:9"), {}, "set MIA_GRAFANA_TOKEN"),
        (("--url", "grafana:3000"), {"MIA_GRAFANA_TOKEN": TOKEN}, "the Grafana URL must look like"),
    ],
)
def test_the_cli_refuses_bad_usage_in_one_line(
    args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    result = mia("dashboards", "push", *args, env=cli_env(**env))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert expected in line and TOKEN not in line


def test_the_cli_reports_an_unreachable_grafana_in_one_line(grafana: FakeGrafana) -> None:
    grafana.stop()
    result = mia("dashboards", "push", "--url", grafana.url, env=cli_env(MIA_GRAFANA_TOKEN=TOKEN))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "mia-detector: error: Grafana: get folder mia-detector: no answer (ConnectionError"
    )


def test_the_cli_builds_the_dashboard_files(tmp_path: Any) -> None:
    out = tmp_path / "dashboards"
    result = mia("dashboards", "build", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) and "wrote " in result.stderr
