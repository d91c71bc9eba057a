"""Pool configuration: RoadRunner's ``pool:`` keys, from keywords or a YAML file.

Durations accept RoadRunner's strings and plain numbers of seconds. Every
mistake (unknown key, wrong type, impossible value) is a ConfigError that
names the key; nothing is coerced.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from shardpool.config import (
    DEFAULT_WORKER,
    MAX_WORKERS,
    Config,
    Duration,
    DynamicAllocatorConfig,
    PoolConfig,
    load_config,
    parse_duration,
    pool_config,
)
from shardpool.errors import ConfigError

RR_POOL_SECTION = """\
pool:
  command: "php worker.php"
  debug: false
  num_workers: 4
  max_jobs: 64
  max_queue_size: 100
  allocate_timeout: 60s
  reset_timeout: 1m
  destroy_timeout: 500ms
  stream_timeout: 1m30s
  supervisor:
    watch_tick: 1s
    ttl: 0s
    idle_ttl: 10s
    exec_ttl: 60s
    max_worker_memory: 128
  dynamic_allocator:
    max_workers: 25
    spawn_rate: 5
    idle_timeout: 10s
"""


def rejected(key: str, **options: Any) -> ConfigError:
    """The ConfigError for ``options``, checked to name ``key``."""
    with pytest.raises(ConfigError) as caught:
        pool_config(**options)
    assert key in str(caught.value), f"{key!r} not named in: {caught.value}"
    return caught.value


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shardpool.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- defaults and overrides


def test_defaults_run_the_bundled_echo_worker_over_pipes() -> None:
    config = pool_config()
    assert config.command == ["php", str(DEFAULT_WORKER)]
    assert config.relay == "pipes"
    assert config.pipeline_depth == 1
    assert config.debug is False
    assert config.dynamic_allocator is None
    assert config.allocate_timeout == 60.0


def test_num_workers_zero_means_one_per_cpu() -> None:
    assert pool_config(num_workers=0).num_workers == (os.cpu_count() or 1)


def test_keyword_overrides_win_over_the_mapping() -> None:
    config = pool_config({"num_workers": 2, "max_jobs": 5}, num_workers=3)
    assert (config.num_workers, config.max_jobs) == (3, 5)


def test_command_string_is_split_like_a_shell() -> None:
    config = pool_config(command="php 'my worker.php' --flag")
    assert config.command == ["php", "my worker.php", "--flag"]


def test_max_workers_is_accepted_at_the_limit() -> None:
    assert pool_config(num_workers=MAX_WORKERS).num_workers == MAX_WORKERS


@pytest.mark.parametrize("relay", ["pipes", "tcp://127.0.0.1:6001", "unix:///tmp/rr.sock"])
def test_each_relay_kind_is_accepted(relay: str) -> None:
    assert pool_config(relay=relay).relay == relay


@pytest.mark.parametrize("depth", [1, 64, "auto"])
def test_pipeline_depth_accepts_1_to_64_and_auto(depth: int | str) -> None:
    assert pool_config(pipeline_depth=depth).pipeline_depth == depth


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60s", 60.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("2.5s", 2.5),
        ("250us", 0.00025),
        ("0", 0.0),
        (2, 2.0),
        (0.25, 0.25),
    ],
)
def test_duration_accepts_go_strings_and_numbers_of_seconds(
    text: str | float, seconds: float
) -> None:
    assert pool_config(destroy_timeout=text).destroy_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["60", "sixty", "5 s", "1x", "s", "", "1e3s"])
def test_duration_without_a_unit_or_malformed_is_rejected_naming_the_key(text: str) -> None:
    rejected("destroy_timeout", destroy_timeout=text)


@pytest.mark.parametrize("value", ["-1s", -1, -0.5])
def test_negative_duration_is_rejected_naming_the_key(value: str | float) -> None:
    rejected("reset_timeout", reset_timeout=value)


def test_boolean_duration_is_rejected() -> None:
    rejected("stream_timeout", stream_timeout=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, "nan", ".inf"])
def test_non_finite_duration_is_rejected_naming_the_key(value: float | str) -> None:
    rejected("allocate_timeout", allocate_timeout=value)


def test_yaml_nan_duration_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("pool.destroy_timeout")):
        load_config(write(tmp_path, "pool:\n  destroy_timeout: .nan\n"))


def test_parse_duration_of_compound_string() -> None:
    assert parse_duration("1h2m3s") == 3723.0


def test_nested_duration_is_rejected_naming_its_full_key() -> None:
    rejected("supervisor.ttl", supervisor={"ttl": "10"})
    rejected("dynamic_allocator.idle_timeout", dynamic_allocator={"idle_timeout": "-1s"})


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_is_rejected_naming_it() -> None:
    rejected("num_worker", num_worker=2)


def test_unknown_nested_key_is_rejected_naming_its_section() -> None:
    error = rejected("tll", supervisor={"tll": "10s"})
    assert "supervisor" in str(error)


# ---------------------------------------------------------------- wrong types, never coerced


@pytest.mark.parametrize("value", ["2", 2.0, True, None])
def test_num_workers_of_the_wrong_type_is_rejected_not_coerced(value: object) -> None:
    rejected("num_workers", num_workers=value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_jobs", "10"),
        ("max_queue_size", 1.5),
        ("debug", "yes"),
        ("debug", 1),
        ("relay", 6001),
        ("pipeline_depth", "2"),
    ],
)
def test_top_level_key_of_the_wrong_type_is_rejected(key: str, value: object) -> None:
    rejected(key, **{key: value})


def test_env_values_must_be_strings() -> None:
    rejected("env", env={"SHARDPOOL_STOP_AFTER": 3})


def test_command_items_must_be_strings() -> None:
    rejected("command", command=["php", 3])


def test_supervisor_section_must_be_a_mapping() -> None:
    rejected("supervisor", supervisor="1s")


def test_max_worker_memory_of_the_wrong_type_is_rejected() -> None:
    rejected("supervisor.max_worker_memory", supervisor={"max_worker_memory": "128"})


# ---------------------------------------------------------------- impossible values


def test_negative_num_workers_is_rejected() -> None:
    rejected("num_workers", num_workers=-1)


def test_num_workers_above_the_max_is_rejected() -> None:
    error = rejected("num_workers", num_workers=MAX_WORKERS + 1)
    assert str(MAX_WORKERS) in str(error)


@pytest.mark.parametrize("key", ["max_jobs", "max_queue_size"])
def test_negative_counts_are_rejected(key: str) -> None:
    rejected(key, **{key: -1})


def test_negative_max_worker_memory_is_rejected() -> None:
    rejected("supervisor.max_worker_memory", supervisor={"max_worker_memory": -5})


def test_zero_watch_tick_is_rejected() -> None:
    rejected("watch_tick", supervisor={"watch_tick": 0})


def test_zero_allocate_timeout_is_rejected() -> None:
    rejected("allocate_timeout", allocate_timeout="0s")


@pytest.mark.parametrize(
    ("key", "value"), [("max_workers", 0), ("max_workers", MAX_WORKERS + 1), ("spawn_rate", 0)]
)
def test_dynamic_allocator_out_of_range_is_rejected(key: str, value: int) -> None:
    rejected(f"dynamic_allocator.{key}", dynamic_allocator={key: value})


@pytest.mark.parametrize("depth", [0, 65])
def test_pipeline_depth_out_of_range_is_rejected(depth: int) -> None:
    rejected("pipeline_depth", pipeline_depth=depth)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("50us", 50e-6), ("50µs", 50e-6), ("1ms", 1e-3), (0, 0.0), ("10ms", 0.01)],
)
def test_busy_poll_takes_a_duration_up_to_10ms_and_0_for_none(
    value: str | int, seconds: float
) -> None:
    assert pool_config(busy_poll=value).busy_poll == pytest.approx(seconds)


def test_busy_poll_is_on_by_default() -> None:
    assert pool_config().busy_poll == pytest.approx(50e-6)


@pytest.mark.parametrize("value", ["11ms", "1s", -1, "fast", True])
def test_a_busy_poll_out_of_range_or_not_a_duration_is_rejected(value: object) -> None:
    rejected("busy_poll", busy_poll=value)


@pytest.mark.parametrize("relay", ["http://127.0.0.1:80", "stdio", ""])
def test_unknown_relay_is_rejected(relay: str) -> None:
    rejected("relay", relay=relay)


@pytest.mark.parametrize("command", ["", [], "   "])
def test_empty_command_is_rejected(command: str | list[str]) -> None:
    rejected("command", command=command)


# ---------------------------------------------------------------- YAML files


def test_load_config_reads_a_roadrunner_pool_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, RR_POOL_SECTION))
    pool = config.pool
    assert isinstance(pool, PoolConfig)
    assert pool.command == ["php", "worker.php"]
    assert (pool.num_workers, pool.max_jobs, pool.max_queue_size) == (4, 64, 100)
    assert (pool.allocate_timeout, pool.reset_timeout) == (60.0, 60.0)
    assert (pool.destroy_timeout, pool.stream_timeout) == (0.5, 90.0)
    sup = pool.supervisor
    assert (sup.watch_tick, sup.ttl, sup.idle_ttl, sup.exec_ttl) == (1.0, 0.0, 10.0, 60.0)
    assert sup.max_worker_memory == 128
    assert pool.dynamic_allocator == DynamicAllocatorConfig(
        max_workers=25, spawn_rate=5, idle_timeout=Duration(10.0)
    )


def test_load_config_of_an_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_load_config_rejects_an_unknown_key_naming_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "pool:\n  num_workers: 2\n  max_job: 10\n")
    with pytest.raises(ConfigError, match="max_job") as caught:
        load_config(path)
    assert "pool" in str(caught.value)


def test_load_config_rejects_a_quoted_number_for_num_workers(tmp_path: Path) -> None:
    path = write(tmp_path, 'pool:\n  num_workers: "2"\n')
    with pytest.raises(ConfigError, match=re.escape("pool.num_workers")):
        load_config(path)


def test_load_config_rejects_negative_workers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("pool.num_workers")):
        load_config(write(tmp_path, "pool:\n  num_workers: -3\n"))


def test_load_config_rejects_a_bad_nested_duration(tmp_path: Path) -> None:
    path = write(tmp_path, "pool:\n  supervisor:\n    exec_ttl: 10 seconds\n")
    with pytest.raises(ConfigError, match=re.escape("pool.supervisor.exec_ttl")):
        load_config(path)


def test_load_config_of_a_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape("nope.yaml")):
        load_config(missing)


def test_load_config_of_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "pool: [unclosed\n"))


def test_load_config_of_a_list_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- pool\n- other\n"))
