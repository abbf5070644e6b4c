//! The postcard codec of `/kaapana/fed/1`: length-prefixed frames with explicit limits.
//!
//! A frame is a 4-byte big-endian length followed by the postcard encoding of a
//! [`FedRequest`] or [`FedResponse`]. The length is checked against the limit before anything
//! is allocated; an oversized request is read and discarded (up to four times the limit) so
//! that the receiver can answer with a typed refusal instead of a reset.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use kaapana_protocol::{FedRequest, FedResponse, MAX_FED_REQUEST, MAX_FED_RESPONSE};
use libp2p::StreamProtocol;

/// What one inbound stream carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FedFrame {
    /// A decoded batch.
    Batch(FedRequest),
    /// A frame over [`MAX_FED_REQUEST`]; its bytes were discarded.
    Oversized {
        /// The length the sender declared.
        len: u64,
    },
    /// A frame that is not a postcard `FedRequest`.
    Malformed {
        /// The decoder's message.
        detail: String,
    },
    /// Outbound only: these bytes as the frame body, unchecked. Lets tests send malformed and
    /// oversized frames over a real connection.
    #[doc(hidden)]
    Raw(Vec<u8>),
}

/// The request-response codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedCodec;

async fn read_frame_len<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<u64> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    Ok(u64::from(u32::from_be_bytes(len)))
}

async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

impl libp2p::request_response::Codec for FedCodec {
    type Protocol = StreamProtocol;
    type Request = FedFrame;
    type Response = FedResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<FedFrame>
    where
        T: AsyncRead + Unpin + Send,
    {
        let len = read_frame_len(io).await?;
        let max = MAX_FED_REQUEST as u64;
        if len > max {
            if len > 4 * max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("request frame of {len} bytes is far over the {max} byte limit"),
                ));
            }
            futures::io::copy(&mut io.take(len), &mut futures::io::sink()).await?;
            return Ok(FedFrame::Oversized { len });
        }
        let mut body = vec![0u8; len as usize];
        io.read_exact(&mut body).await?;
        Ok(match postcard::from_bytes::<FedRequest>(&body) {
            Ok(req) => FedFrame::Batch(req),
            Err(e) => FedFrame::Malformed { detail: e.to_string() },
        })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<FedResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let len = read_frame_len(io).await?;
        if len > MAX_FED_RESPONSE as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("response frame of {len} bytes is over the {MAX_FED_RESPONSE} byte limit"),
            ));
        }
        let mut body = vec![0u8; len as usize];
        io.read_exact(&mut body).await?;
        postcard::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: FedFrame,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let body = match req {
            FedFrame::Batch(batch) => postcard::to_allocvec(&batch)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            FedFrame::Raw(bytes) => bytes,
            FedFrame::Oversized { .. } | FedFrame::Malformed { .. } => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only batches and raw frames can be sent",
                ));
            }
        };
        write_frame(io, &body).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: FedResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let body = postcard::to_allocvec(&res)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_frame(io, &body).await
    }
}
