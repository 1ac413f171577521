"""splitfed services: each a thin gRPC servicer over plain handler functions."""
