// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @title Fast-worker licence
/// @notice One ERC-721 token per licence. A fast worker must hold at least one valid licence
///         (not blacklisted). Governance can blacklist a licence (it stays with its holder but
///         stops counting and cannot be transferred) or burn it outright.
/// @dev `validBalance` is maintained on every mint/transfer/burn/blacklist so `hasValidLicense`
///      is a single storage read, cheap enough for coordinators to poll per worker.
///      Roles: DEFAULT_ADMIN_ROLE is governance (blacklist, burn, roles); MINTER_ROLE mints.
contract WorkerLicense is ERC721, AccessControl {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    uint256 public nextTokenId = 1;
    mapping(uint256 tokenId => bool) public blacklisted;
    mapping(address account => uint256) public validBalance;

    event Blacklisted(uint256 indexed tokenId, bool blacklisted);

    error ZeroAddress();
    error EmptyBatch();
    error LicenseBlacklisted(uint256 tokenId);

    constructor(address governance) ERC721("Sogni Worker License", "SOGNI-WL") {
        if (governance == address(0)) revert ZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, governance);
        _grantRole(MINTER_ROLE, governance);
    }

    /// @notice Mint one licence to each address in `to`, with consecutive ids.
    /// @return firstId the id minted to `to[0]`; `to[i]` gets `firstId + i`.
    function mintBatch(address[] calldata to) external onlyRole(MINTER_ROLE) returns (uint256 firstId) {
        if (to.length == 0) revert EmptyBatch();
        firstId = nextTokenId;
        for (uint256 i = 0; i < to.length; ++i) {
            _mint(to[i], firstId + i);
        }
        nextTokenId = firstId + to.length;
    }

    /// @notice Stop `tokenId` from counting as a valid licence and freeze its transfers.
    function blacklist(uint256 tokenId) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setBlacklisted(tokenId, true);
    }

    /// @notice Undo a blacklisting (a wrongly accused worker gets the licence back).
    function unblacklist(uint256 tokenId) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setBlacklisted(tokenId, false);
    }

    /// @notice Destroy `tokenId` regardless of its holder.
    function burn(uint256 tokenId) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _burn(tokenId);
    }

    function hasValidLicense(address account) external view returns (bool) {
        return validBalance[account] > 0;
    }

    function supportsInterface(bytes4 interfaceId) public view override(ERC721, AccessControl) returns (bool) {
        return super.supportsInterface(interfaceId);
    }

    function _setBlacklisted(uint256 tokenId, bool value) private {
        address owner = _requireOwned(tokenId);
        if (blacklisted[tokenId] == value) return;
        blacklisted[tokenId] = value;
        if (value) {
            validBalance[owner] -= 1;
        } else {
            validBalance[owner] += 1;
        }
        emit Blacklisted(tokenId, value);
    }

    /// @dev Keeps `validBalance` in step; blacklisted tokens may only be burned.
    function _update(address to, uint256 tokenId, address auth) internal override returns (address from) {
        bool isBlacklisted = blacklisted[tokenId];
        if (isBlacklisted && to != address(0)) revert LicenseBlacklisted(tokenId);
        from = super._update(to, tokenId, auth);
        if (isBlacklisted) {
            delete blacklisted[tokenId];
        } else {
            if (from != address(0)) validBalance[from] -= 1;
            if (to != address(0)) validBalance[to] += 1;
        }
    }
}
