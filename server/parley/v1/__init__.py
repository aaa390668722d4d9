"""Generated protobuf and gRPC code (`make proto`) lands in this package. Only this file is committed,
so that the package exists, and Parley installs, before the code is generated."""
