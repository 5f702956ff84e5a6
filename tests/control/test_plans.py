"""The plans file: DESIGN.md's example as written, checks naming file and key, live reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from framework.control.plans import PlanBook, join_inline_tables, load_plans
from framework.tenant_config import ConfigError

DESIGN_EXAMPLE = '''
[plans.free]
isolation = "shared"                 # shared | process | dedicated
services = ["*"]                     # entitlements: globs over service names
limits = { rate = 10, burst = 10, user_rate = 5, concurrency = 2,
           daily_quota = 1000, daily_cpu_seconds = 60, degraded_rate = 1 }
prices = { currency = "EUR", per_call = 0.0002, per_cpu_second = 0.03, per_gb = 0.08 }
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plans.toml"
    path.write_text(text)
    return path


def test_the_design_example_loads_as_written(tmp_path: Path) -> None:
    plans = load_plans(write(tmp_path, DESIGN_EXAMPLE)).plans
    free = plans["free"]
    assert free.limits["daily_quota"] == 1000 and free.limits["degraded_rate"] == 1
    assert free.prices.per_gb == 0.08 and free.default_placement == "pool:shared"
    assert free.entitled("anything")


def test_entitlement_globs(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.pro]\nisolation = "dedicated"\nservices = ["echo", "report*"]\n')
    pro = load_plans(path).plans["pro"]
    assert pro.entitled("echo") and pro.entitled("report_daily")
    assert not pro.entitled("echoes") and not pro.entitled("admin")
    assert pro.default_placement == "dedicated"


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("", "plans", "required key missing"),
    ("[plans.Free]\nisolation = 'shared'\nservices = []\n", "plans.Free", "invalid name"),
    ("[plans.a]\nisolation = 'shared'\nservices = []\nprices = { currency = 'euro' }\n",
     "plans.a.prices.currency", ""),
    ("[plans.a]\nisolation = 'shared'\nservices = []\nlimits = { speed = 1 }\n",
     "plans.a.limits.speed", "unknown key"),
    ("[plans.a]\nisolation = 'shared'\nservices = []\nlimits = { rate = inf }\n",
     "plans.a.limits.rate", "finite"),
    ("[plans.a\n", "", "invalid TOML"),
    ("[plans.a]\nlimits = { rate = 1, # comment\n burst = 2 }\n", "", "invalid TOML"),
])
def test_a_bad_file_names_file_key_and_reason(tmp_path: Path, text: str, key: str,
                                              reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_plans(path)
    assert err.value.file == str(path) and err.value.key == key
    assert reason in err.value.reason


def test_strings_keep_their_newlines_and_braces() -> None:
    text = 'a = "{"\nb = { c = 1,\n d = "}\\"" }\ne = \'{\'\n'
    assert join_inline_tables(text) == 'a = "{"\nb = { c = 1,  d = "}\\"" }\ne = \'{\'\n'


def test_reload_versions_and_keeps_the_old_plans_on_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.a]\nisolation = "shared"\nservices = ["*"]\n')
    book = PlanBook(path, interval=0)
    assert book.get().version == 1 and not book.reload()
    path.write_text('[plans.a]\nisolation = "process"\nservices = ["*"]\n')
    os.utime(path, ns=(1, 1))  # a new stamp even within one clock tick
    assert book.get().version == 2 and book.current.plans["a"].isolation == "process"
    path.write_text('[plans.a]\nisolation = "moon"\nservices = ["*"]\n')
    os.utime(path, ns=(2, 2))
    assert book.get().version == 2 and "plans.a.isolation" in book.error
    path.write_text('[plans.a]\nisolation = "process"\nservices = ["*"]\n')
    os.utime(path, ns=(3, 3))
    assert not book.reload() and book.error == ""  # same content: no new version
    path.unlink()
    assert not book.reload() and book.current.version == 2
