"""host_memory.available_bytes: the smaller of the host's MemAvailable and the memory cgroup's headroom."""

from __future__ import annotations

from kvtriton.backend.models.host_memory import available_bytes


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_container_limit_counts_where_it_is_below_the_hosts_available_memory(tmp_path):
    meminfo = write(tmp_path / "meminfo", "MemTotal:  64000000 kB\nMemAvailable:  50000000 kB\n")
    v2 = tmp_path / "v2"
    write(v2 / "memory.max", "8589934592\n")  # a pod limited to 8 GiB, 3 GiB of it in use
    write(v2 / "memory.current", "3221225472\n")
    assert available_bytes(v2, meminfo) == 5 * 2**30
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "memory.limit_in_bytes", "4294967296\n")
    write(v1 / "memory" / "memory.usage_in_bytes", "1073741824\n")
    assert available_bytes(v1, meminfo) == 3 * 2**30


def test_no_limit_leaves_the_hosts_available_memory(tmp_path):
    meminfo = write(tmp_path / "meminfo", "MemAvailable:  1000 kB\n")
    v2 = tmp_path / "v2"
    write(v2 / "memory.max", "max\n")
    write(v2 / "memory.current", "5\n")
    assert available_bytes(v2, meminfo) == 1000 * 1024
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(v1 / "memory" / "memory.usage_in_bytes", "5\n")
    assert available_bytes(v1, meminfo) == 1000 * 1024
    assert available_bytes(tmp_path / "none", tmp_path / "no-meminfo") is None


def test_this_host_reports_a_figure():
    assert available_bytes() is None or available_bytes() > 0
