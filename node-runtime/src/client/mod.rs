//! Client library: discover, route, tokenize, generate.
