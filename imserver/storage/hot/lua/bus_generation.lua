-- ARGV[2]: a fresh generation, written if the bus has none (see
-- generation() in the prelude). Returns the generation.
return generation(ARGV[2])
