"""Server reflection, v1 as well as v1alpha (grpcio-reflection ships only v1alpha, and a v1
client such as a recent grpcurl or Postman would get UNIMPLEMENTED).

The two protocols are the same messages under another package name, so one servicer
answers both: the v1 service decodes and encodes with the v1alpha message classes (the
bytes are identical), and its descriptor, derived from v1alpha's by renaming the package,
is added to the descriptor pool so that reflection can describe the v1 service too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's reflection.proto, renamed to v1 (the messages are the same)."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = f".{V1_PACKAGE}." + f.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            for name in ("input_type", "output_type"):
                setattr(method, name, f".{V1_PACKAGE}." + getattr(method, name).removeprefix(old))
    return proto


def _register_v1(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())


def enable_reflection(
    service_names: Iterable[str], server: grpc.aio.Server, pool: descriptor_pool.DescriptorPool
) -> None:
    """Reflection v1 and v1alpha for `service_names`, whose files `pool` holds (the
    reflection services are added, and v1's file to the pool)."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    _register_v1(pool)
    servicer = v1alpha.aio.ReflectionServicer(names, pool=pool)
    v1alpha_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
