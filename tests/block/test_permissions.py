import pytest

from qmpd.block.permissions import (
    ALL, Perm, PermissionUse, check_conflicts, cumulative, format_child_perms, perm_names)
from qmpd.errors import QMPError

CR, W, R = Perm.CONSISTENT_READ, Perm.WRITE, Perm.RESIZE


def test_perm_names_in_bit_order():
    assert perm_names(R | W) == "write, resize"
    assert perm_names(CR) == "consistent read"
    assert perm_names(Perm.WRITE_UNCHANGED) == "write unchanged"


def test_qcow2_rw_takes_write_and_resize_and_refuses_sharing_them():
    assert format_child_perms(read_only=False, metadata=True) == (CR | W | R, ALL & ~(W | R))
    assert format_child_perms(read_only=True, metadata=True) == (CR, ALL & ~(W | R))


def test_raw_luks_takes_only_consistent_read_until_updating_keys():
    assert format_child_perms(read_only=False, metadata=False) == (CR, ALL)
    assert format_child_perms(read_only=False, metadata=False, updating_keys=True) == \
        (CR | W, ALL & ~(CR | W))


def test_conflict_text_matches_qemu_for_second_qcow2_parent():
    perm, shared = format_child_perms(read_only=False, metadata=True)
    uses = [PermissionUse("node 'q1'", "file", perm, shared),
            PermissionUse("node 'q0'", "file", perm, shared)]
    with pytest.raises(QMPError) as info:
        check_conflicts("f0", uses)
    assert info.value.desc == (
        "Permission conflict on node 'f0': permissions 'write, resize' are both required "
        "by node 'q0' (uses node 'f0' as 'file' child) and unshared by node 'q1' "
        "(uses node 'f0' as 'file' child).")


def test_conflict_text_matches_qemu_for_amend_beside_reader():
    reader = PermissionUse("node 'l1'", "file", *format_child_perms(read_only=False, metadata=False))
    updater = PermissionUse("node 'l0'", "file", *format_child_perms(
        read_only=False, metadata=False, updating_keys=True))
    with pytest.raises(QMPError) as info:
        check_conflicts("f1", [reader, updater])
    assert info.value.desc == (
        "Permission conflict on node 'f1': permissions 'consistent read' are both required "
        "by node 'l1' (uses node 'f1' as 'file' child) and unshared by node 'l0' "
        "(uses node 'f1' as 'file' child).")


def test_two_raw_luks_readers_share():
    use = format_child_perms(read_only=False, metadata=False)
    check_conflicts("f", [PermissionUse("node 'a'", "file", *use),
                          PermissionUse("node 'b'", "file", *use)])
    assert cumulative([PermissionUse("node 'a'", "file", CR, ALL),
                       PermissionUse("node 'b'", "file", W, ALL & ~R)]) == (CR | W, ALL & ~R)
