//! Running the real api and worker binaries.
