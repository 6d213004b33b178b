//! sha256 of a whole file and of each 4 MiB chunk, computed in one pass over the bytes as
//! they are written (split) or read back (verify).

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

pub const CHUNK_SIZE: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHashes {
    pub size: u64,
    pub sha256: String,
    pub chunk_sha256: Vec<String>,
}

#[derive(Default)]
pub struct ChunkHasher {
    whole: Sha256,
    chunk: Sha256,
    in_chunk: usize,
    size: u64,
    chunks: Vec<String>,
}

impl ChunkHasher {
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (CHUNK_SIZE - self.in_chunk).min(data.len());
            self.chunk.update(&data[..take]);
            self.in_chunk += take;
            data = &data[take..];
            if self.in_chunk == CHUNK_SIZE {
                self.chunks.push(hex::encode(self.chunk.finalize_reset()));
                self.in_chunk = 0;
            }
        }
    }

    pub fn finish(mut self) -> FileHashes {
        if self.in_chunk > 0 || self.chunks.is_empty() {
            self.chunks.push(hex::encode(self.chunk.finalize()));
        }
        FileHashes {
            size: self.size,
            sha256: hex::encode(self.whole.finalize()),
            chunk_sha256: self.chunks,
        }
    }
}

/// A writer that hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: ChunkHasher,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: ChunkHasher::default(),
        }
    }

    pub fn finish(self) -> (W, FileHashes) {
        (self.inner, self.hasher.finish())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes a file by streaming it through a fixed buffer.
pub fn hash_file(path: &Path) -> io::Result<FileHashes> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = ChunkHasher::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_at_4_mib() {
        let data = vec![7u8; CHUNK_SIZE + 10];
        let mut h = ChunkHasher::default();
        h.update(&data[..100]);
        h.update(&data[100..]);
        let got = h.finish();
        assert_eq!(got.size, data.len() as u64);
        assert_eq!(got.chunk_sha256.len(), 2);
        assert_eq!(
            got.chunk_sha256[0],
            hex::encode(Sha256::digest(&data[..CHUNK_SIZE]))
        );
        assert_eq!(
            got.chunk_sha256[1],
            hex::encode(Sha256::digest(&data[CHUNK_SIZE..]))
        );
        assert_eq!(got.sha256, hex::encode(Sha256::digest(&data)));
    }
}
