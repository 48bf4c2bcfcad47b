"""
The generated protobuf and gRPC modules of C{dapr.proto.sentry.v1}
(C{sentry.proto}); regenerate them with C{tox -e proto}, never edit them by
hand.
"""
