//! A minimal RESP2 client over a raw `TcpStream`: enough to probe and inspect a test server
//! without a Redis client library.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One reply, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text: strings as they are, integers in decimal, nil as `(nil)`, the elements
    /// of an array one per line, an error inside an array as `(error) MESSAGE`.
    pub(crate) fn into_text(self) -> Result<String, String> {
        match self {
            Reply::Error(message) => Err(message),
            other => Ok(other.text()),
        }
    }

    fn text(self) -> String {
        match self {
            Reply::Simple(text) => text,
            Reply::Error(message) => format!("(error) {message}"),
            Reply::Integer(number) => number.to_string(),
            Reply::Bulk(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => "(nil)".to_owned(),
            Reply::Array(Some(items)) => items
                .into_iter()
                .map(Reply::text)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// Where a server listens: a TCP port on 127.0.0.1, or a Unix socket (a server whose only
/// TCP port speaks TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    Tcp(u16),
    Unix(std::path::PathBuf),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read(buf),
            Stream::Unix(stream) => stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.write(buf),
            Stream::Unix(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.flush(),
            Stream::Unix(stream) => stream.flush(),
        }
    }
}

/// A connection to a server on 127.0.0.1 or a Unix socket.
pub(crate) struct Connection {
    reader: BufReader<Stream>,
}

impl Connection {
    pub(crate) fn open(address: &Address, timeout: Duration) -> io::Result<Connection> {
        let stream = match address {
            Address::Tcp(port) => {
                let address = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
                let stream = TcpStream::connect_timeout(&address, timeout)?;
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
            Address::Unix(path) => Stream::Unix(unix(path, timeout)?),
        };
        Ok(Connection {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one command and reads its reply.
    pub(crate) fn call(&mut self, args: &[&str]) -> io::Result<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&request)?;
        self.read_reply()
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection before a whole reply",
            ));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| invalid("a reply line is not UTF-8"))
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        let line = self.read_line()?;
        let (kind, rest) = line
            .split_at_checked(1)
            .ok_or_else(|| invalid("an empty reply line"))?;
        match kind {
            "+" => Ok(Reply::Simple(rest.to_owned())),
            "-" => Ok(Reply::Error(rest.to_owned())),
            ":" => Ok(Reply::Integer(number(rest)?)),
            "$" => {
                let Ok(length) = usize::try_from(number(rest)?) else {
                    return Ok(Reply::Bulk(None));
                };
                let mut bytes = vec![0; length + 2];
                io::Read::read_exact(&mut self.reader, &mut bytes)?;
                bytes.truncate(length);
                Ok(Reply::Bulk(Some(bytes)))
            }
            "*" => {
                let Ok(count) = usize::try_from(number(rest)?) else {
                    return Ok(Reply::Array(None));
                };
                let items = (0..count)
                    .map(|_| self.read_reply())
                    .collect::<io::Result<_>>()?;
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(invalid(&format!("an unknown reply type: {line:?}"))),
        }
    }
}

fn unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

fn number(text: &str) -> io::Result<i64> {
    text.parse()
        .map_err(|_| invalid(&format!("not a number in a reply: {text:?}")))
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}
