"""Command-line behaviour a user meets first: init, id, peers, config mistakes, exit codes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import unicodedata

import pytest
from helpers import REPLD, Rep, make_replicas, run, snapshot
from repld.daemon.applier import Applier
from repld.daemon.localsync import _opener
from repld.daemon.replica import open_replica
from repld.protocol.plan import plan_pull

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def test_init_id_and_peers(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    ident = json.loads(a("id", "--json").stdout)
    assert set(ident) == {"replica_id", "name", "tree_id", "public_key", "endpoint"}
    assert ident["name"] == "a" and len(ident["public_key"]) == 40
    assert oct((a.state / "keys" / "curve.secret").stat().st_mode & 0o777) == "0o600"
    a("peer", "add", "desk", "tcp://127.0.0.1:7440", KEY)
    peers = json.loads(a("peer", "list", "--json").stdout)
    assert peers == [{"name": "desk", "endpoint": "tcp://127.0.0.1:7440", "public_key": KEY}]
    # The same name and key at another address: the peer moved (a trial had to remove it and
    # add it again, which a running peer daemon logs as a refusal). Another key: refused.
    config_before = a.config.read_text()
    moved = a("peer", "add", "desk", "tcp://127.0.0.1:7441", KEY)
    assert "its endpoint is now tcp://127.0.0.1:7441 (was tcp://127.0.0.1:7440)" in moved.stdout
    assert a.config.read_text() == config_before.replace(":7440", ":7441")  # nothing else
    assert "nothing changed" in a("peer", "add", "desk", "tcp://127.0.0.1:7441", KEY).stdout
    other = KEY[::-1]
    dup = a("peer", "add", "desk", "tcp://127.0.0.1:7441", other, check=False)
    assert dup.returncode == 2 and "exists already, with another public key" in dup.stderr
    a("peer", "remove", "desk")
    assert json.loads(a("peer", "list", "--json").stdout) == []
    missing = a("peer", "remove", "desk", check=False)
    assert missing.returncode == 2 and "no peer named" in missing.stderr


def test_id_prints_a_peer_add_command_that_survives_the_shell(tmp_path):
    """What `repld id` tells a user to run on the other machine, pasted into a shell, admits
    exactly this key, whatever characters of the Z85 alphabet it holds."""
    a, b = make_replicas(tmp_path, "a", "b")
    ident = json.loads(a("id", "--json").stdout)
    line = a("id").stdout.splitlines()[-1].strip()
    assert line.startswith("repld peer add a tcp://") and line.endswith(f"'{ident['public_key']}'")
    as_b = f"{shlex.join(REPLD)} --config {shlex.quote(str(b.config))} "
    command = line.replace("repld ", as_b, 1)
    subprocess.run(["bash", "-c", command], check=True, capture_output=True, timeout=60)
    (peer,) = json.loads(b("peer", "list", "--json").stdout)
    assert peer["public_key"] == ident["public_key"]
    assert peer["endpoint"] == f"tcp://{socket.gethostname()}:7437"  # not the wildcard it binds


@pytest.mark.parametrize("args,expect", [
    (["peer", "add", "x", "http://host:1", KEY], "bad endpoint"),
    (["peer", "add", "x", "tcp://host:99999", KEY], "bad endpoint"),
    (["peer", "add", "x", "tcp://host:7437", "short"], "(5 characters, not 40)"),
    (["peer", "add", "x", "tcp://host:7437", KEY[:39] + '"'], """('"' cannot be in a key)"""),
    (["peer", "add", "bad name", "tcp://host:7437", KEY], "bad name"),
])
def test_bad_peer_arguments_exit_2(tmp_path, args, expect):
    (a,) = make_replicas(tmp_path, "a")
    proc = a(*args, check=False)
    assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr


def _broken(tmp_path, text: str):
    (a,) = make_replicas(tmp_path, "a")
    a.config.write_text(text.format(root=a.root, state=a.state))
    return a


GOOD = 'root = "{root}"\nstate = "{state}"\nname = "a"\nlisten = "tcp://0.0.0.0:7437"\n'


@pytest.mark.parametrize("text,expect", [
    ("root = \n", "not valid TOML"),
    (GOOD + "colour = 'blue'\n", "'colour'"),
    (GOOD.replace("tcp://0.0.0.0:7437", "tcp//nope"), "bad endpoint"),
    (GOOD.replace('name = "a"\n', ""), "'name'"),
    (GOOD + "conflict_policy = 'coin-toss'\n", "conflict_policy"),
    (GOOD + "[[peer]]\nname = 'x'\nendpoint = 'tcp://h:1'\n", "public_key"),
    (GOOD + "scan_interval = 'often'\n", "scan_interval"),
    (GOOD + "scan_interval = true\n", "expected a whole number of seconds, got true"),  # TOML's words
    (GOOD + "scan_interval = '60'\n", 'got a quoted string, "60"'),
])
def test_config_mistakes_exit_2_naming_file_and_key(tmp_path, text, expect):
    a = _broken(tmp_path, text)
    proc = a("scan", check=False)  # (`id` needs no root: it works while a disk is unmounted)
    assert proc.returncode == 2, proc.stderr
    assert str(a.config) in proc.stderr and expect in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_root_that_is_not_there_is_no_config_error_but_names_the_key(tmp_path):
    """Of a replica that exists, a missing root is most likely a disk not mounted (the daemon
    waits for it): exit 1 as for a sync, naming the config's `root` as the other suspect."""
    a = _broken(tmp_path, GOOD.replace('root = "{root}"', 'root = "/does/not/exist"'))
    proc = a("scan", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "/does/not/exist is not there" in proc.stderr and "unmounted disk" in proc.stderr
    assert f"`root` in {a.config}" in proc.stderr


def test_missing_config_and_unreadable_key(tmp_path):
    proc = run("--config", tmp_path / "nope.toml", "scan", check=False)
    assert proc.returncode == 2 and "repld init" in proc.stderr
    (a,) = make_replicas(tmp_path, "a")
    (a.state / "keys" / "curve.public").unlink()
    proc = a("id", check=False)
    assert proc.returncode == 2 and "key file" in proc.stderr


def test_init_refuses_to_overwrite(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    proc = a("init", a.root, check=False)
    assert proc.returncode == 2 and "already there" in proc.stderr
    proc = run("--config", tmp_path, "init", a.root, check=False)  # a directory, by mistake
    assert proc.returncode == 2 and "a directory; --config names the config file" in proc.stderr
    a.config.unlink()  # the config gone, the state left: a usage error, and what it holds
    proc = a("init", a.root, "--state", a.state, check=False)
    assert proc.returncode == 2, proc
    assert "the state of a replica made before" in proc.stderr and "keys" in proc.stderr


def test_init_of_another_replicas_root_is_refused(tmp_path):
    """A trial made a second replica (another config, another tree even) of a root that was a
    replica already, with no word: each would record the other's writes as its own edits."""
    (a,) = make_replicas(tmp_path, "a")
    try:
        os.getxattr(a.root, "user.repld.config")
    except OSError:
        pytest.skip("no extended attributes on this file system: the check cannot be made")
    second = tmp_path / "second.toml"
    proc = run("--config", second, "init", a.root, "--name", "second", check=False)
    assert proc.returncode == 2, proc
    assert f"already the root of the replica of {a.config}" in proc.stderr, proc.stderr
    assert not second.exists()
    run("--config", second, "init", a.root, "--name", "second", "--force")
    # A config removed for good frees its root: no --force needed.
    second.unlink()
    a.config.unlink()
    run("--config", tmp_path / "third.toml", "init", a.root, "--name", "third")


def test_replicas_that_overlap_are_refused_or_kept_apart(tmp_path):
    """A trial made replicas of a directory inside another replica's root, and of one holding
    it, with no word: every file there would have two replicas writing it."""
    (a,) = make_replicas(tmp_path, "a")
    try:
        os.getxattr(a.root, "user.repld.config")
    except OSError:
        pytest.skip("no extended attributes on this file system: the check cannot be made")
    (a.root / "sub").mkdir()
    (a.root / "sub" / "f.txt").write_text("in a's tree\n")
    inner = tmp_path / "inner.toml"
    proc = run("--config", inner, "init", a.root / "sub", "--name", "inner", check=False)
    assert proc.returncode == 2, proc
    assert f"inside {a.root}, the root of the replica of {a.config}" in proc.stderr, proc.stderr
    assert "'sub'" in proc.stderr and ".repldignore" in proc.stderr
    assert not inner.exists()
    (a.root / ".repldignore").write_text("sub/\n")  # a says it is none of its business
    run("--config", inner, "init", a.root / "sub", "--name", "inner")
    # One holding a's root: a's tree is left to a, said as such; the rest is recorded.
    (tmp_path / "mine.txt").write_text("outer\n")
    outer = tmp_path / "outer.toml"
    out = run("--config", outer, "init", tmp_path, "--name", "outer", "--state",
              tmp_path / "outer.state")  # fmt: skip
    assert "the root of another replica" in out.stdout + out.stderr, out
    dump = run("--config", outer, "dump").stdout
    assert "mine.txt" in dump and "f.txt" not in dump and "a.toml" in dump


def test_status_without_daemon_exits_3(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    assert a("status", check=False).returncode == 3


def test_usage_errors_exit_2(tmp_path):
    assert run("frobnicate", check=False).returncode == 2
    proc = run("status", "--jsn", check=False)  # a typo: the command's own usage, not repld's
    assert proc.returncode == 2 and "usage: repld status" in proc.stderr, proc.stderr
    (a,) = make_replicas(tmp_path, "a")
    proc = a("sync", "nosuchpeer", check=False)
    assert proc.returncode == 2 and "no such config file" in proc.stderr


def test_scan_verbose_and_dump_escape_names(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    (a.root / "two words\nline").write_text("x")
    out = a("scan", "-v").stdout
    assert "create  two\\swords\\nline" in out
    dump = a("dump").stdout.splitlines()
    assert any(line.startswith("two\\swords\\nline file ") for line in dump)
    assert all(len(line.split(" ")) == 11 for line in dump[2:])


def test_local_edit_during_sync_becomes_conflict_not_overwrite(tmp_path):
    """The local file changes after the plan was made: it is rescanned, never overwritten."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f.txt").write_text("base\n")
    a.sync(b)
    (a.root / "f.txt").write_text("newer on a\n")
    a("scan")
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        rb.scan()
        steps = list(plan_pull(rb.store.get, ra.store.records_since(0),
                               replica=rb.store.replica_id))
        # Meanwhile, someone edits b's copy, and nothing has recorded it yet.
        (b.root / "f.txt").write_text("unrecorded edit on b\n")

        def replan(step):
            from repld.protocol.plan import plan_record

            rb.scan([step.path])
            return plan_record(rb.store.get(step.path), ra.store.get(step.path),
                               replica=rb.store.replica_id, local_lookup=rb.store.get)

        stats = Applier(rb.store, rb.root, _opener(ra), replan=replan).apply(steps)
    assert stats.conflicts == 1
    texts = sorted(p.read_text() for p in b.root.glob("f*.txt"))
    assert texts == ["newer on a\n", "unrecorded edit on b\n"]


def test_writing_through_a_symlinked_directory_is_refused(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    outside = tmp_path / "outside"
    outside.mkdir()
    (a.root / "d").mkdir()
    (a.root / "d" / "f.txt").write_text("payload\n")
    (b.root / "d").symlink_to(outside)  # b has a symlink where a has a directory
    a.sync(b, check=False)
    assert list(outside.iterdir()) == []
    assert os.path.islink(b.root / "d") or (b.root / "d").is_dir()


def test_init_of_a_home_directory_brings_the_default_ignore_rules(tmp_path):
    home = tmp_path / "home"
    (home / ".cache" / "thumbs").mkdir(parents=True)
    (home / ".cache" / "thumbs" / "x.png").write_bytes(b"png")
    (home / "notes.txt").write_text("mine\n")
    (home / "notes.txt~").write_text("editor backup\n")
    (home / "app.db").write_bytes(b"db")
    (home / "app.db-wal").write_bytes(b"wal")  # committed data: replicated
    (home / "app.db-shm").write_bytes(b"shm")  # rebuilt from the -wal: not
    (home / "code" / ".git" / "refs" / "heads").mkdir(parents=True)
    (home / "code" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (home / "code" / ".git" / "index.lock").write_bytes(b"")  # git at work
    (home / "code" / ".git" / "refs" / "heads" / "main.lock").write_bytes(b"")
    # Folders of documents named like build outputs are the user's (a trial: skipped at any
    # depth by the rules `build/`, `dist/`, `target/`); caches of package managers are not.
    for folder in ("build", "dist", "target"):
        (home / "Documents" / folder).mkdir(parents=True)
        (home / "Documents" / folder / "plan.pdf").write_bytes(b"%PDF")
    (home / ".npm" / "_cacache").mkdir(parents=True)
    (home / ".npm" / "_cacache" / "index").write_bytes(b"cache")
    (home / ".config" / "Code" / "GPUCache").mkdir(parents=True)
    (home / ".config" / "Code" / "GPUCache" / "data_0").write_bytes(b"cache")
    (home / ".config" / "Code" / "settings.json").write_text("{}\n")
    env = {**os.environ, "HOME": str(home)}
    config = tmp_path / "home.toml"
    out = run("--config", config, "init", home, "--name", "a", env=env).stdout
    assert f"wrote {home / '.repldignore'}" in out
    assert "# Caches and trash" in (home / ".repldignore").read_text()
    dump = run("--config", config, "dump", env=env).stdout
    assert "notes.txt" in dump and ".repldignore" in dump
    assert ".cache" not in dump and "notes.txt~" not in dump
    assert "app.db-wal" in dump and "code/.git/HEAD" in dump
    assert "app.db-shm" not in dump and ".lock" not in dump, dump
    for folder in ("build", "dist", "target"):
        assert f"Documents/{folder}/plan.pdf" in dump, dump
    assert "_cacache" not in dump and "GPUCache" not in dump, dump
    cached = run("--config", config, "log", home / ".npm/_cacache/index", env=env, check=False)
    assert cached.returncode == 2 and "it is ignored here" in cached.stderr, cached
    assert ".config/Code/settings.json" in dump
    # The rules never keep their own file from replicating (a trial's `.*` did).
    (home / ".repldignore").write_text(".*\n")
    run("--config", config, "scan", env=env)
    assert " update " in run("--config", config, "log", home / ".repldignore", env=env).stdout

    other = tmp_path / "projects"  # not a home directory: no rules are made up for it
    (other / "build").mkdir(parents=True)
    out = run("--config", tmp_path / "p.toml", "init", other, "--name", "p", env=env).stdout
    assert "wrote" not in out and not (other / ".repldignore").exists()

    (home / ".repldignore").write_text("only-this/\n")  # a home with rules of its own keeps them
    (config).unlink()
    run("--config", config, "init", home, "--name", "b", "--state", tmp_path / "s2", env=env)
    assert (home / ".repldignore").read_text() == "only-this/\n"


def test_paths_are_taken_as_a_user_means_them_and_mistakes_exit_2(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "docs").mkdir()
    (a.root / "docs" / "x.txt").write_text("x\n")
    (a.root / "other.txt").write_text("other\n")
    # PATH after an option; an absolute PATH; a PATH relative to a directory in the tree.
    out = a.sync(b, "-n", "docs").stdout
    assert "docs/x.txt" in out and "other.txt" not in out
    out = a.sync(b, "-n", str(a.root / "docs")).stdout
    assert "docs/x.txt" in out and "other.txt" not in out
    proc = subprocess.run([*REPLD, "--config", a.config, "sync", b.config, "-n", "x.txt"],
                          cwd=a.root / "docs", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "docs/x.txt" in proc.stdout and "other" not in proc.stdout
    # From outside the tree, a PATH that names something in it from there.
    proc = subprocess.run([*REPLD, "--config", a.config, "sync", b.config, "-n", "a/docs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "docs/x.txt" in proc.stdout and "other" not in proc.stdout
    copy = a.config.with_name("a-copy.conf")
    copy.write_bytes(a.config.read_bytes())
    # A state directory copied whole: another database, the same replica id (exit 1 before).
    (tmp_path / "clone").mkdir()
    cloned = tmp_path / "clone" / "a.toml"
    shutil.copytree(a.state, tmp_path / "clone" / "a.state")
    cloned.write_text(re.sub(r"^(state|root) = .*$", lambda m: f'{m[1]} = "{getattr(a, m[1])}"',
                             a.config.read_text(), flags=re.M).replace(
                                 str(a.state), str(tmp_path / "clone" / "a.state")))  # fmt: skip
    for args, expect in [
        (["sync", cloned], f"are the same replica (replica id {a.identity()['replica_id']}): "
                           "one state directory copied"),
        (["sync", b.config, "nosuch"], "in neither replica"),
        (["sync", b.config, "/etc"], "not inside the replicated tree"),
        (["sync", a.config], "this replica's own config"),
        (["sync", copy], "are configs of the same replica"),  # not "in use by another repld"
        (["sync", tmp_path], f"is a directory: sync takes the other replica's config file, the "
                             f"one `repld init` wrote (there: {a.config}, {b.config}"),
        (["sync", b.root], "is a directory"),
        (["sync", "/dev/null"], "/dev/null is not a regular file"),
        (["scan", "nosuch"], "not in the tree"),
        (["sync"], "required: TARGET\n"),
    ]:
        proc = a(*args, check=False)
        assert proc.returncode == 2 and expect in proc.stderr, (args, proc.stderr)
    assert not (b.root / "docs").exists()


def test_a_usb_replica_mounted_elsewhere_still_syncs(tmp_path):
    """A replica made on a removable disk, its config beside its tree: init writes root and
    state relative to the config, so the disk mounted at another path is the same replica
    (it was a config error naming the old mount point). A relative path typed by hand is
    taken from the config's directory too, and a path outside it stays absolute."""
    (home,) = make_replicas(tmp_path, "home")
    (home.root / "docs").mkdir()
    (home.root / "docs" / "a.txt").write_text("a\n")
    stick = tmp_path / "media" / "stick"
    (stick / "tree").mkdir(parents=True)
    usb = Rep("usb", stick / "tree", stick / "repld.toml")
    usb("init", usb.root, "--name", "usb", "--tree-id", home.tree_id())
    text = usb.config.read_text()
    assert 'root = "tree"' in text and 'state = "repld.state"' in text, text
    home.sync(usb)

    moved = tmp_path / "run" / "media" / "STICK"  # the next time it is plugged in
    moved.parent.mkdir(parents=True)
    stick.rename(moved)
    usb = Rep("usb", moved / "tree", moved / "repld.toml")
    (home.root / "docs" / "b.txt").write_text("b\n")
    home.sync(usb)
    assert snapshot(home.root) == snapshot(usb.root)
    assert json.loads(usb("id", "--json").stdout)["name"] == "usb"

    # By hand: relative to the config's directory, not to where the command runs.
    (moved / "tree2").mkdir()
    text = usb.config.read_text().replace('root = "tree"', 'root = "./tree2/../tree"')
    usb.config.write_text(text)
    proc = subprocess.run([*REPLD, "--config", usb.config, "scan"], cwd="/", capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "0 created, 0 updated, 0 deleted" in proc.stdout, proc
    # A state directory outside the config's directory is written as the absolute path.
    other = Rep("other", moved / "tree3", moved / "other.toml")
    other.root.mkdir()
    other("init", other.root, "--name", "other", "--state", tmp_path / "other-state")
    text = other.config.read_text()
    assert 'root = "tree3"' in text and f'state = "{tmp_path / "other-state"}"' in text, text


def test_a_path_typed_in_the_other_unicode_form_finds_the_file(tmp_path):
    """Linux names are bytes: café in NFD (e + accent, as some tools and macOS write it) and
    café in NFC are two names, and both replicate as they are; a PATH typed in the form the
    keyboard gives finds the file the disk has."""
    a, b = make_replicas(tmp_path, "a", "b")
    nfd, nfc = unicodedata.normalize("NFD", "café.txt"), unicodedata.normalize("NFC", "café.txt")
    (a.root / nfd).write_text("decomposed\n")
    a.sync(b)
    assert (b.root / nfd).read_text() == "decomposed\n" and not (b.root / nfc).exists()
    out = b("log", nfc).stdout
    assert "create by" in out and out.splitlines()[0] == f"history of {nfd}:"
    assert a.sync(b, "-n", nfc).returncode == 0


def test_a_path_through_a_symlink_in_the_tree_is_a_usage_error_naming_the_real_one(tmp_path):
    """repld records a symlink, never follows it: `sync ld/note.txt` through the link ld
    synced nothing and exited 0 (a trial)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "docs").mkdir()
    (a.root / "docs" / "note.txt").write_text("n\n")
    (a.root / "ld").symlink_to("docs")
    a.sync(b)
    assert a.sync(b, "ld").returncode == 0  # the link itself is a path of the tree
    for given in ("ld/note.txt", str(a.root / "ld" / "note.txt")):
        proc = a.sync(b, given, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "ld is a symlink in the tree (to docs)" in proc.stderr
        assert "give the path it points to: docs/note.txt" in proc.stderr


def test_config_and_debug_are_taken_after_the_command_too(tmp_path):
    """`repld status --config X` and `repld run --debug` were usage errors (a trial)."""
    (a,) = make_replicas(tmp_path, "a")
    proc = run("id", "--json", "--config", a.config)
    assert proc.returncode == 0 and json.loads(proc.stdout)["name"] == "a"
    proc = run("status", "--config", a.config, check=False)
    assert proc.returncode == 3 and "repld is not running" in proc.stderr, proc.stderr
    proc = run("peer", "list", "--config", a.config, "--debug")
    assert proc.returncode == 0
    proc = run("--config", tmp_path / "nosuch.toml", "id", "--config", a.config)
    assert proc.returncode == 0  # the one after the command wins


def test_a_second_replica_on_this_machine_is_not_named_after_the_host_too(tmp_path):
    """Both were the host name: `vm <- ...` for either side of a sync (a trial)."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"),
               XDG_STATE_HOME=str(tmp_path / "xdg-state"), HOME=str(tmp_path))  # fmt: skip
    env.pop("REPLD_CONFIG", None)
    (tmp_path / "home").mkdir()
    (tmp_path / "usb").mkdir()
    run("init", tmp_path / "home", env=env)
    host = socket.gethostname().split(".")[0]
    assert json.loads(run("id", "--json", env=env).stdout)["name"] == host
    run("--config", tmp_path / "usb.toml", "init", tmp_path / "usb", env=env)
    usb = json.loads(run("--config", tmp_path / "usb.toml", "id", "--json", env=env).stdout)
    assert usb["name"] == f"{host}-usb"


def test_a_replica_inside_another_is_refused(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    (a.root / "f.txt").write_text("f\n")
    (a.root / "nested").mkdir()
    args = ("--config", tmp_path / "in.toml", "init", a.root / "nested", "--name", "in",
            "--tree-id", a.tree_id())  # fmt: skip
    assert run(*args, check=False).returncode == 2  # init refuses it...
    run(*args, "--force")
    proc = a("sync", tmp_path / "in.toml", check=False)  # ...and, forced, so does sync
    assert proc.returncode == 1 and "inside the other replica's root" in proc.stderr
    assert list((a.root / "nested").iterdir()) == []


def test_resolve_between_a_directory_and_a_symlink_says_what_to_do(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "escape").mkdir()
    (a.root / "escape" / "inside.txt").write_text("kept\n")
    (b.root / "escape").symlink_to("/tmp")
    a.sync(b, check=False)
    a.sync(b)
    (copy,) = [p.name for p in a.root.iterdir() if ".conflict-" in p.name]
    assert (a.root / copy).is_symlink() and (a.root / "escape").is_dir()  # a directory wins
    assert f"other version: {copy} (symlink, modified" in a("conflicts").stdout  # not "0 B"
    assert json.loads(a("conflicts", "--json").stdout)[0]["copy_kind"] == "symlink"
    proc = a("resolve", "escape", "--keep", "remote", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "escape is a directory" in proc.stderr and "symlink" in proc.stderr
    assert (a.root / "escape" / "inside.txt").read_text() == "kept\n"
    a("resolve", "escape", "--keep", "local")
    assert not (a.root / copy).exists()


def test_prune_drops_the_tombstones_no_other_replica_needs(tmp_path):
    """A lone replica: no other replica to have seen them, so they all go (with -n: none)."""
    (a,) = make_replicas(tmp_path, "a")
    for n in range(3):
        (a.root / f"f{n}").write_text("x\n")
    a("scan")
    for n in range(3):  # events of f0's that go with its tombstone, and f2's that go as old
        (a.root / "f0").write_text(f"f0 {n}\n")
        (a.root / "f2").write_text(f"f2 {n}\n")
        a("scan")
    (a.root / "f0").unlink()
    (a.root / "f1").unlink()
    a("scan")

    def recorded() -> list[str]:
        return sorted(ln.split()[0] for ln in a("dump").stdout.splitlines()
                      if not ln.startswith("#"))  # fmt: skip

    out = a("prune", "-n").stdout
    assert "would drop 2 tombstones every replica has seen (dry run)" in out, out
    assert "no tombstones would be kept" in out, out  # (it said "2 tombstones kept")
    dry = json.loads(a("prune", "-n", "--json").stdout)
    assert recorded() == ["f0", "f1", "f2"]
    out = a("prune").stdout
    assert "dropped 2 tombstones every replica has seen" in out and "no tombstones kept" in out
    assert recorded() == ["f2"]
    assert f"dropped {dry['history_dropped']} older event(s)" in out, (dry, out)
    assert dry["history_dropped"] == 3  # f2's first three of four
    gone = a("log", "f0", check=False)  # its history went with it, and it says so
    assert gone.returncode == 2 and "or deleted and pruned since" in gone.stderr, gone
    assert json.loads(a("prune", "--json").stdout)["tombstones"] == 0


def test_a_file_made_again_where_a_tombstone_was_pruned_beats_the_tombstone_elsewhere(tmp_path):
    """After a prune here, another replica may keep the tombstone a while: the file made here
    again at that path (new, or renamed there) must win over it, not be deleted everywhere
    (a new-user trial lost both files that way: the version count started again at 1)."""
    a, b = make_replicas(tmp_path, "a", "b")
    for name in ("f1", "x", "y", "stays"):
        (a.root / name).write_text(f"{name} v1\n")
    for n in range(3):  # a few events on f1 and x: their tombstones count higher than 1
        (a.root / "f1").write_text(f"f1 v{n + 2}\n")
        (a.root / "x").write_text(f"x v{n + 2}\n")
        a("scan")
    a.sync(b)
    (a.root / "f1").unlink()
    (a.root / "x").unlink()
    a.sync(b)
    assert "dropped 2 tombstones" in a("prune").stdout  # b keeps its own
    (a.root / "f1").write_text("brand new content\n")
    (a.root / "y").rename(a.root / "x")
    out = a.sync(b, "-v").stdout
    assert "a: 0 files written (0 B, 0 from local copies), 0 deleted" in out, out
    assert "delete  f1" not in out and "delete  x" not in out, out
    assert (b.root / "f1").read_text() == "brand new content\n"
    assert (b.root / "x").read_text() == "y v1\n" and not (b.root / "y").exists()
    assert snapshot(a.root) == snapshot(b.root)
    # And on a daemon-less rescan, nothing changes its mind.
    assert "0 created, 0 updated, 0 deleted" in a("scan").stdout


def test_prune_keeps_a_files_history_from_growing_with_every_save(tmp_path):
    """DESIGN: no unbounded histories. Events every replica has seen a later one of go; the
    newest stays, and events a replica has not acknowledged yet stay too."""
    a, b = make_replicas(tmp_path, "a", "b")
    log = a.root / "app.log"
    for i in range(6):
        with open(log, "a") as f:
            f.write(f"line {i}\n")
        a("scan")
    a.sync(b)
    with open(log, "a") as f:
        f.write("not synced yet\n")
    a("scan")

    def events() -> list[dict]:
        return json.loads(a("log", "app.log", "--json").stdout)["events"]

    assert len(events()) == 7  # 6 saves b has, and the last one
    assert "would drop 5 older event(s)" in a("prune", "-n").stdout
    assert len(events()) == 7
    out = a("prune").stdout
    assert "older event(s) of files' histories" in out, out
    kept = events()
    # b acknowledged a's records up to the sync: what came before it goes, save the newest of
    # those; the save b has not seen stays.
    assert len(kept) == 2 and kept[-1]["size"] == log.stat().st_size, kept
    a.sync(b)
    a("prune")
    assert len(events()) == 1
    assert json.loads(a("prune", "--json").stdout)["history_dropped"] == 0
    assert b("log", "app.log").returncode == 0


def test_prune_says_which_replicas_have_seen_the_tombstones(tmp_path):
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    for n in range(3):
        (a.root / f"f{n}").write_text("x\n")
    a("sync", b.config)
    (c.root / "from-c").write_text("c\n")
    c("sync", b.config)  # c's edit reaches a through b only
    a("sync", b.config)
    a("peer", "add", "d", "tcp://127.0.0.1:18999", c.identity()["public_key"])  # never met
    (a.root / "f0").unlink()
    (a.root / "f1").unlink()
    a("scan")

    def report() -> dict[str, dict]:
        proc = a("prune", "--json", check=False)
        assert proc.returncode == 0
        out = json.loads(proc.stdout)
        assert out["tombstones"] == 2 and out["droppable"] == 0
        return {r["name"] or r["replica_id"]: r for r in out["replicas"]}

    before = report()
    assert before["b"]["how"] == "synced" and before["b"]["unseen"] == 2
    assert before["b"]["newest_unseen"] in ("f0", "f1")
    assert before["d"]["how"] == "configured" and before["d"]["unseen"] is None
    c_id = c.identity()["replica_id"]
    # c never synced with a: b says how far c holds a's records (not the deletions yet).
    assert before[c_id]["how"] == "through a peer" and before[c_id]["via"] == "b"
    assert before[c_id]["unseen"] == 2
    assert a.identity()["replica_id"] not in before and "a" not in before  # not itself

    a("sync", b.config)
    after = report()
    assert after["b"]["unseen"] == 0 and after["b"]["last_sync"].startswith("20")
    text = a("prune", check=False).stdout
    assert "b (" in text and "has seen them all" in text
    assert f"{c_id[:8]}: never synced with this replica; b says how far" in text
    assert "d: a peer not met yet" in text
    assert "none can be dropped while a replica below cannot tell what it has seen" in text
    # On b, a's own deletions are not "unseen by a", whatever b's mark for a says.
    on_b = {r["name"]: r for r in json.loads(b("prune", "--json").stdout)["replicas"]}
    assert on_b["a"]["unseen"] == 0, on_b["a"]

    # Once a has met every replica it knows of, and each has the deletions: dropped.
    a("peer", "remove", "d")
    a("sync", c.config)
    out = a("prune").stdout
    assert "dropped 2 tombstones" in out and "no tombstones kept" in out, out
    # Nothing comes back from the replicas that keep them, nor when they drop theirs.
    for other in (b, c):
        a("sync", other.config)
    assert not (a.root / "f0").exists() and not (b.root / "f0").exists()
    # c took the deletions from a, not from b; but a holds b's tombstones in the very version
    # b has them (taken from a), and says c holds what a held: b may drop them.
    out = b("prune").stdout
    assert "dropped 2 tombstones" in out and "has seen them all (as a says)" in out, out
    c("sync", b.config)
    assert "dropped 2 tombstones" in c("prune").stdout
    for other in (b, c):
        a("sync", other.config)
    assert sorted(p.name for p in b.root.iterdir()) == ["f2", "from-c"]
    assert snapshot(a.root) == snapshot(b.root) == snapshot(c.root)


def test_a_file_brought_back_where_a_tombstone_was_pruned_is_deleted_again(tmp_path):
    """q pruned z.txt's tombstone (it never heard of s), and s brought the file back to q:
    p, which still has the tombstone and knows q acknowledged it, sends it again (a trial
    found p and q apart for good, each taking the other as up to date)."""
    p, q, s = make_replicas(tmp_path, "p", "q", "s")
    (p.root / "z.txt").write_text("z\n")
    p.sync(q)
    s.sync(p)
    (p.root / "z.txt").unlink()
    p.sync(q)
    assert "dropped 1 tombstone" in q("prune").stdout
    assert "q <- write   z.txt" in s.sync(q, "-v").stdout  # back on q
    p.sync(q)
    assert not (q.root / "z.txt").exists() and not (p.root / "z.txt").exists()
    s.sync(q)
    assert not (s.root / "z.txt").exists()
    assert snapshot(p.root) == snapshot(q.root) == snapshot(s.root)


def test_prune_in_a_chain_counts_what_the_middle_replica_says_of_the_far_end(tmp_path):
    """a and c never meet (a chain a-b-c): a used to wait for c forever ("known from its
    edits only"). b tells a how far c holds a's records, as b's own numbers translate."""
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    for n in range(3):
        (a.root / f"f{n}").write_text("x\n")
    a.sync(b)
    b.sync(c)
    (c.root / "from-c").write_text("c was here\n")  # a hears of c
    c.sync(b)
    a.sync(b)
    (a.root / "f0").unlink()
    a.sync(b)  # b has the deletion, c not yet

    def report(rep) -> dict[str, dict]:
        out = json.loads(rep("prune", "-n", "--json").stdout)
        return {r["name"] or r["replica_id"][:8]: r for r in out["replicas"]} | {"": out}

    c_id = c.identity()["replica_id"][:8]
    before = report(a)
    assert before[c_id]["how"] == "through a peer" and before[c_id]["via"] == "b", before
    assert before[c_id]["unseen"] == 1 and before[""]["droppable"] == 0
    assert "b says how far it holds this replica's records" in a("prune", "-n").stdout
    b.sync(c)  # c has it now; b hears so
    assert not (c.root / "f0").exists()
    a.sync(b)  # and tells a
    assert report(a)[c_id]["unseen"] == 0
    out = a("prune").stdout
    assert "dropped 1 tombstone" in out, out
    # c, at the other end, learns the same way of a, whose deletion it holds anyway.
    for other in (b, c):
        other.sync(b if other is c else a)
    for rep in (a, b, c):
        assert not (rep.root / "f0").exists(), rep.name
    assert snapshot(a.root) == snapshot(b.root) == snapshot(c.root)


def test_a_middle_replica_with_ignore_rules_of_its_own_does_not_speak_for_the_far_end(tmp_path):
    """b ignores *.log: a's deletion of x.log never went on from b to c, so what b knows of
    c says nothing of it, and a must not drop that tombstone on b's word."""
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "x.log").write_text("log\n")
    (c.root / "from-c").write_text("c\n")  # a hears of c
    a.sync(b)
    b.sync(c)
    a.sync(b)
    text = b.config.read_text()
    b.config.write_text(text.replace("ignore = []", 'ignore = ["*.log"]'))
    (a.root / "x.log").unlink()
    for x, y in ((a, b), (b, c), (a, b)):
        x.sync(y)
    assert (c.root / "x.log").exists()  # never heard of the deletion
    out = json.loads(a("prune", "--json").stdout)
    assert out["dropped"] == 0 and out["tombstones"] == 1, out
    c_id = c.identity()["replica_id"]
    (row,) = [r for r in out["replicas"] if r["replica_id"] == c_id]
    assert row["unseen"] == 1, row  # (what b said before its rules changed stands)


def test_a_path_ignored_on_one_replica_during_a_prune_converges_once_let_through(tmp_path):
    """c ignored *.log when a deleted x.log, and acknowledged a's records all the same; a and b
    pruned the tombstone. When c let *.log through again, x.log stayed on c alone for good,
    every side in sync (a trial). c now offers its record again: the file comes back (what
    prune accepts at worst), and the replicas are the same."""
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "x.log").write_text("log data\n")
    (a.root / "keep.txt").write_text("kept\n")
    a.sync(b)
    a.sync(c)
    text = c.config.read_text()
    c.config.write_text(text.replace("ignore = []", 'ignore = ["*.log"]'))
    (a.root / "x.log").unlink()
    a.sync(b)
    a.sync(c)
    b.sync(c)
    a.sync(b)
    assert (c.root / "x.log").exists()  # ignored there: the deletion skipped
    assert "dropped 1 tombstone" in a("prune").stdout
    assert "dropped 1 tombstone" in b("prune").stdout
    c.config.write_text(text)  # *.log let through again
    for x, y in ((c, a), (c, b), (a, b), (c, a)):
        x.sync(y)
    assert snapshot(a.root) == snapshot(b.root) == snapshot(c.root)


def test_prune_forget_stops_waiting_for_a_replica_gone_for_good(tmp_path):
    """A machine sold or wiped would hold every later tombstone back forever: --forget it.
    Should it sync again, it counts again."""
    a, b, old = make_replicas(tmp_path, "a", "b", "old")
    for n in range(3):
        (a.root / f"f{n}").write_text("x\n")
    a.sync(b)
    a.sync(old)
    (a.root / "f0").unlink()
    a.sync(b)
    assert json.loads(a("prune", "--json").stdout)["droppable"] == 0  # old has not seen it

    proc = a("prune", "--forget", "nosuch", check=False)
    assert proc.returncode == 2 and "no replica of that name or id" in proc.stderr
    assert "known: b, old" in proc.stderr, proc.stderr
    proc = a("prune", "--forget", "a", check=False)
    assert proc.returncode == 1 and "that is this replica" in proc.stderr
    a("peer", "add", "old", "tcp://127.0.0.1:18998", old.identity()["public_key"])
    proc = a("prune", "--forget", "old", check=False)
    assert proc.returncode == 1 and "repld peer remove old" in proc.stderr
    a("peer", "remove", "old")

    out = a("prune", "-n", "--forget", "old").stdout
    assert "would drop 1 tombstone" in out and "forgotten (`--forget`, on this dry run)" in out
    assert json.loads(a("prune", "--json").stdout)["droppable"] == 0  # a dry run notes nothing
    old_id = old.identity()["replica_id"]
    out = a("prune", "--forget", old_id[:8]).stdout  # an id does as well as a name
    assert "dropped 1 tombstone" in out and "old (" in out and "not waited for" in out, out
    # Forgotten stays forgotten: the next deletion is not held back by it either.
    (a.root / "f1").unlink()
    a.sync(b)
    report = json.loads(a("prune", "--json").stdout)
    # (f0's tombstone came back from b, which keeps it until it prunes too: both go.)
    assert report["dropped"] >= 1 and report["tombstones"] == 0, report
    assert [r["name"] for r in report["forgotten"]] == ["old"]

    # It comes back after all: it counts again, and a's deletions it has not seen are its own
    # to receive (nothing a user wrote is lost; here the files it still had come back).
    (a.root / "f2").unlink()
    a("scan")
    a.sync(old)
    report = json.loads(a("prune", "--json").stdout)
    assert report["forgotten"] == [] and "old" in [r["name"] for r in report["replicas"]]
    assert snapshot(a.root) == snapshot(old.root)
    assert not (old.root / "f2").exists() and (a.root / "f0").exists()


def test_output_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    (a.root / "f.txt").write_text("x\n")
    a("scan")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*REPLD, "--config", str(a.config), "dump"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert "cannot write the output: No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*REPLD, "sync", "--help"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "cannot write the output" in proc.stderr, proc.stderr
    # A reader that stops early (`| head -1`) is no error worth a message.
    proc = subprocess.run(f"{shlex.join([*REPLD, '--config', str(a.config)])} "
                          "dump | head -c 1 > /dev/null; echo ${PIPESTATUS[0]}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.stderr == ""


def test_a_full_state_directory_is_an_error_that_the_next_sync_repairs(tmp_path, small_tmpfs):
    (h,) = make_replicas(tmp_path, "h")
    # u2's state (its database) on the small file system, its tree elsewhere.
    u2 = Rep("u2", tmp_path / "u2", tmp_path / "u2.toml")
    u2.root.mkdir()
    u2("init", u2.root, "--name", "u2", "--state", small_tmpfs / "u2.state",
       "--tree-id", h.tree_id())  # fmt: skip
    for i in range(1000):
        (h.root / f"f{i:04}").write_text(f"{i}\n")
    st = os.statvfs(small_tmpfs)
    with open(small_tmpfs / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 150 * 1024))
    proc = h.sync(u2, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "full" in proc.stderr and str(small_tmpfs) in proc.stderr
    (small_tmpfs / "filler").unlink()
    h.sync(u2)
    assert sorted(p.name for p in u2.root.iterdir()) == sorted(p.name for p in h.root.iterdir())
    assert "0 actions planned" in h.sync(u2, "-n").stdout


def test_a_repld_state_directory_inside_the_tree_is_never_recorded(tmp_path):
    """Another replica's state (say ~/.local/state/repld of a second config) holds its secret
    key: init and later scans leave it out, and say so."""
    (a,) = make_replicas(tmp_path, "a")
    other = Rep("o", tmp_path / "o", tmp_path / "o.toml")
    other.root.mkdir()
    other("init", other.root, "--name", "o", "--state", a.root / "cfg" / "o.state")
    (a.root / "cfg" / "notes.txt").write_text("replicated\n")
    a("scan")
    dump = a("dump").stdout
    assert "cfg/notes.txt" in dump and "o.state" not in dump and "curve" not in dump
    proc = a("scan", check=False)
    assert "not replicated: cfg/o.state: a repld state directory" in proc.stderr, proc.stderr
    # A scan of paths inside it (what the daemon's watcher asks for) leaves it out too.
    proc = a("scan", "cfg/o.state/keys/curve.secret", check=False)
    assert "a repld state directory" in proc.stderr
    assert "o.state" not in a("dump").stdout


def test_init_again_after_losing_the_database_keeps_the_replicas_keys(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    key = json.loads(a("id", "--json").stdout)["public_key"]
    (a.state / "repld.db").unlink()
    a.config.unlink()
    proc = a("init", a.root, "--name", "a", "--state", a.state,
             "--tree-id", "00000000-0000-4000-8000-000000000001")  # fmt: skip
    assert "keeping the keys of the earlier replica" in proc.stderr
    assert json.loads(a("id", "--json").stdout)["public_key"] == key


def test_prune_forget_takes_the_old_id_of_a_reinstalled_peer(tmp_path):
    """A trial: a peer reinstalled (its state deleted, `repld rejoin`) syncs under its name
    with a new id; its old id holds every tombstone back for good, and the `--forget OLDID`
    that prune suggested was refused: "b is a configured peer"."""
    from repld.daemon import config as configmod

    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f0").write_text("x\n")
    (a.root / "f1").write_text("y\n")
    a.sync(b)
    old_id = b.identity()["replica_id"]
    a("peer", "add", "b", "tcp://127.0.0.1:18997", b.identity()["public_key"])
    (a.root / "f0").unlink()
    a("scan")
    shutil.rmtree(configmod.load(b.config).state)  # reinstalled: the tree kept, its state gone
    b("rejoin", "--tree-id", a.identity()["tree_id"])
    assert b.identity()["replica_id"] != old_id
    a.sync(b)
    assert not (b.root / "f0").exists()
    out = a("prune", "-n").stdout
    assert "and will not: b has synced since as" in out, out
    assert "its next sync with this replica brings them" not in out, out
    out = a("prune", "--forget", old_id[:8]).stdout  # refused before: "a configured peer"
    assert "dropped 1 tombstone" in out and "not waited for" in out, out
    proc = a("prune", "--forget", "b", check=False)  # its current id still may not be
    assert proc.returncode == 1 and "b is a configured peer" in proc.stderr, proc.stderr
    # Forgotten by an earlier prune: a dry run does not claim to do it now.
    (a.root / "f1").unlink()
    a("scan")
    out = a("prune", "-n").stdout
    assert "forgotten (`--forget`): not waited for" in out, out


def test_a_name_with_a_newline_cannot_forge_a_log_line(tmp_path):
    """A trial: a file name holding a newline split a daemon's log line in two, so a name could
    write a line of its own into the log."""
    (a,) = make_replicas(tmp_path, "a")
    os.mkfifo(a.root / "pipe\nrepld: ERROR: forged")  # not replicated: said in the log
    proc = a("--debug", "scan")
    lines = proc.stderr.splitlines()
    assert not [ln for ln in lines if ln.startswith("repld: ERROR: forged")], proc.stderr
    assert [ln for ln in lines if "pipe\\nrepld: ERROR: forged: not replicated" in ln], proc.stderr


def test_version_says_which_repld_and_which_wire_protocol():
    """A newcomer's trial: README says peers must speak the same wire version, and nothing
    said which one this repld speaks."""
    from repld.protocol.messages import WIRE_VERSION

    proc = subprocess.run([*REPLD, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("repld ") and f"wire protocol {WIRE_VERSION}" in proc.stdout


def test_peer_add_says_when_a_host_name_does_not_resolve_and_how_to_name_a_namesake(tmp_path):
    """A newcomer's trial: a peer at a name that does not resolve was only ever "nothing
    answers" in status; and two replicas both named after the host (no --name) could not be
    made each other's peer, with no hint of a way."""
    a, b = make_replicas(tmp_path, "a", "b")
    key = b.identity()["public_key"]
    bad = "x" * 64 + ".example"  # (refused by the resolver here, with or without a network)
    proc = a("peer", "add", "far", f"tcp://{bad}:7437", key)
    assert f"note: the name {bad} does not resolve here now" in proc.stderr, proc.stderr
    a("peer", "remove", "far")
    proc = a("peer", "add", "near", "tcp://127.0.0.1:7437", key)
    assert "does not resolve" not in proc.stderr
    a("peer", "remove", "near")
    proc = a("peer", "add", "a", "tcp://127.0.0.1:7437", key, check=False)
    assert proc.returncode == 2 and "`repld peer add a-2 ...`" in proc.stderr, proc.stderr


def test_a_system_error_names_the_path_without_pythons_errno_form(tmp_path):
    """`init --state` under a regular file printed "[Errno 20] Not a directory: '...'" (a
    trial): the path first, then the system's words."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "root").mkdir()
    proc = run("--config", tmp_path / "c.toml", "init", tmp_path / "root",
               "--state", tmp_path / "afile" / "sub", check=False)  # fmt: skip
    assert proc.returncode == 1, proc
    assert f"repld: {tmp_path / 'afile' / 'sub'}: Not a directory" in proc.stderr, proc.stderr
    assert "[Errno" not in proc.stderr and "Traceback" not in proc.stderr
