"""Generated code of the Open Inference Protocol (protos/gruserve/inference/grpc_service.proto;
regenerate with `make proto`)."""
