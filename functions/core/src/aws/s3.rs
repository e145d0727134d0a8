//! S3 adapter of [`BlobStore`]: the payload bucket of the claim check.

use async_trait::async_trait;
pub use aws_sdk_s3::Client;

/// A client whose every call `meter` counts.
pub fn metered_client(config: &aws_types::SdkConfig, meter: &crate::aws::meter::Meter) -> Client {
    Client::from_conf(
        aws_sdk_s3::config::Builder::from(config)
            .interceptor(meter.clone())
            .build(),
    )
}
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};

use super::{build_error, classify};
use crate::Error;
use crate::ports::BlobStore;

/// DeleteObjects' most keys a call.
const DELETE_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct S3Blobs {
    client: Client,
    bucket: String,
}

impl S3Blobs {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        Self {
            client,
            bucket: bucket.into(),
        }
    }
}

#[async_trait]
impl BlobStore for S3Blobs {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| classify("PutObject", e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, Error> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify("GetObject", e))?;
        let bytes = output
            .body
            .collect()
            .await
            .map_err(|e| Error::transient("GetObject body", e))?;
        Ok(bytes.into_bytes().to_vec())
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), Error> {
        for chunk in keys.chunks(DELETE_BATCH) {
            let objects = chunk
                .iter()
                .map(|key| ObjectIdentifier::builder().key(key).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| build_error("ObjectIdentifier", e))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| build_error("Delete", e))?;
            let output = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify("DeleteObjects", e))?;
            if let Some(error) = output.errors().first() {
                return Err(Error::transient(
                    "DeleteObjects",
                    format!(
                        "{} of {} keys not deleted, e.g. {}: {}",
                        output.errors().len(),
                        chunk.len(),
                        error.key().unwrap_or_default(),
                        error.code().unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("ListObjectsV2", e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(keys)
    }
}
