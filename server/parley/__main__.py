from parley.cli import main

# The guard matters: TensorRT-LLM's multi-GPU workers (mpi4py) import the main module again.
if __name__ == "__main__":
    main()
