"""xml-pipeline's benchmark suite: `make bench`. Each figure is printed beside a baseline measured in the same run."""
