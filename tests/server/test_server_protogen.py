"""Generated stubs: up to date, staleness detected, KServe wire-compatible with tritonclient."""

from __future__ import annotations

import shutil

import tritonclient.grpc.service_pb2 as triton_pb
from google.protobuf import descriptor_pb2

from densemap.service import protogen
from densemap.service.server import kserve_proto


def test_committed_stubs_are_up_to_date():
    assert protogen.find_stale() == []


def test_check_fails_with_a_clear_message_when_a_proto_changed(tmp_path, capsys):
    protos = tmp_path / "protos"
    shutil.copytree(protogen.PROTOS_DIR, protos)
    source = protos / "densemap" / "v1" / "densemap.proto"
    source.write_text(source.read_text() + "\nmessage Extra { int32 x = 1; }\n")
    stale = protogen.find_stale(protos_dir=protos)
    assert "densemap/v1/densemap_pb2.py (differs)" in stale
    assert protogen.main(["--check", "--protos", str(protos)]) == 1
    message = capsys.readouterr().err
    assert "stale" in message and "python -m densemap.service.protogen" in message


def _fields(message: descriptor_pb2.DescriptorProto, prefix: str) -> dict:
    found = {}
    for field in message.field:
        found[f"{prefix}.{field.name}"] = (field.number, field.type, field.label, field.type_name)
    for nested in message.nested_type:
        found.update(_fields(nested, f"{prefix}.{nested.name}"))
    return found


def test_kserve_messages_match_tritonclient_field_by_field():
    ours = descriptor_pb2.FileDescriptorProto()
    kserve_proto.POOL.FindFileByName("inference/grpc_service.proto").CopyToProto(ours)
    theirs = descriptor_pb2.FileDescriptorProto()
    triton_pb.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    their_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert message.name in their_messages, message.name
        assert _fields(message, message.name) == _fields(their_messages[message.name], message.name)
    (our_service,) = ours.service
    (their_service,) = [s for s in theirs.service if s.name == our_service.name]
    their_methods = {m.name: m for m in their_service.method}
    for method in our_service.method:
        assert method.input_type == their_methods[method.name].input_type
        assert method.output_type == their_methods[method.name].output_type
    assert {m.name for m in our_service.method} == {rpc for rpc, _, _ in kserve_proto.RPCS}
